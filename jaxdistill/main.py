"""One CLI: `python -m jaxdistill <command> --config=experiments/<system>/<name>.py [--config.x=y ...]`."""

from __future__ import annotations

import importlib
import sys
import time

from absl import flags
from ml_collections import config_flags

# command -> (module:function taking the config, one-line help)
COMMANDS = {
    "train": ("jaxdistill.distill.train:run", "self-distillation with privileged information (the main job)"),
    "route": ("jaxdistill.router.run:run", "dynamic ensemble router: precompute expert paths, train PPO, evaluate"),
    "sample": ("jaxdistill.main:sample", "chat with, or complete from, any loadable model"),
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (a .py with get_config())")


def usage() -> str:
    lines = ["usage: python -m jaxdistill <command> --config=experiments/<system>/<name>.py [--config.key=value ...]",
             "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Each config file's docstring shows the command that runs it."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command = argv[1]
    if command not in COMMANDS:
        print(f"unknown command {command!r}.\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        flags.FLAGS(["jaxdistill", *argv[2:]])
        config = _CONFIG.value
    except (flags.Error, AttributeError, KeyError, ValueError) as e:  # bad flag, config typo, bad value
        print(f"error in the command line or config: {e}", file=sys.stderr)
        return 2
    if config is None:
        print(f"error: --config is required, e.g. --config=experiments/{command}/default.py", file=sys.stderr)
        return 2
    module, function = COMMANDS[command][0].split(":")
    getattr(importlib.import_module(module), function)(config)
    return 0


def sample(config) -> None:
    """Chat with (config.chat=True) or complete from a model; prints each reply."""
    from jaxdistill import sampling
    from jaxdistill.models import load

    model, tokenizer = load(config.model, dtype=config.dtype)
    prompts = [config.prompt] if isinstance(config.prompt, str) else list(config.prompt)
    if config.chat:
        messages = [[{"role": "system", "content": config.system}] if config.system else [] for _ in prompts]
        token_prompts = [tokenizer.chat(m + [{"role": "user", "content": p}]) for m, p in zip(messages, prompts,
                                                                                            strict=True)]
    else:
        token_prompts = [tokenizer.encode(p) for p in prompts]
    s = config.sample
    rule = sampling.rule_from_config(s.temperature, s.top_k, s.top_p)
    start = time.perf_counter()
    out = sampling.generate(model, token_prompts, max_new_tokens=s.max_new_tokens, rule=rule, rng=s.seed,
                            eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id)
    seconds = time.perf_counter() - start
    for prompt, sequence in zip(prompts, out.sequences(), strict=True):
        print(f">>> {prompt}\n{tokenizer.decode(sequence)}\n")
    print(f"[{int(out.lengths.sum())} tokens in {seconds:.1f}s, compile included, model {config.model}]")


if __name__ == "__main__":
    sys.exit(main())
