"""One CLI: `python -m jaxdistill <command> --config=experiments/<system>/<name>.py [--config.x=y ...]`.

Errors a user can fix (bad settings, data, files) print as one line; `--verbose` shows the
traceback. `<command> --help` lists the command's config fields and their defaults.
"""

from __future__ import annotations

import difflib
import importlib
import sys
import time
import traceback
from pathlib import Path

from absl import flags
from ml_collections import config_flags

from jaxdistill.errors import UserError

# command -> (module:function taking the config, one-line help, its default config)
COMMANDS = {
    "train": ("jaxdistill.distill.train:run", "self-distillation with privileged information (the main job)",
              "experiments/self_distill/default.py"),
    "route": ("jaxdistill.router.run:run", "dynamic ensemble router: precompute expert paths, train PPO, evaluate",
              "experiments/router/default.py"),
    "teachers": ("jaxdistill.teachers.run:run", "teacher stack: single teachers vs aggregation rules, diversity",
                 "experiments/teachers/default.py"),
    "prune": ("jaxdistill.teachers.pruning:run", "branch search: learned (PPO) vs heuristic pruning",
              "experiments/teachers/pruning.py"),
    "sample": ("jaxdistill.main:sample", "chat with, or complete from, any loadable model",
               "experiments/sample/default.py"),
    "export": ("jaxdistill.models.export:export", "write any loadable model or finished run as a Hugging Face "
               "directory (safetensors, config, tokenizer)", None),
    "compile": ("jaxdistill.main:compile_job", "compile a job's programs for a TPU topology or GPUs (--target=...) "
                "without weights or devices, and report per-device memory", "experiments/self_distill/default.py"),
}
# compile: which system's programs a config describes (by a key only that system's configs have)
COMPILE_MODULES = (("arm", "jaxdistill.distill.compile"), ("experts", "jaxdistill.router.compile"),
                   ("teachers", "jaxdistill.teachers.compile"))
HELP_FLAGS = ("-h", "--help", "--helpfull", "help")

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (a .py with get_config())")


def usage() -> str:
    lines = ["usage: python -m jaxdistill <command> --config=experiments/<system>/<name>.py [--config.key=value ...]",
             "       python -m jaxdistill compile --config=... --target=v5p:4x4x2|h100:8|... [--out=compile.json]",
             "       python -m jaxdistill export SOURCE OUT_DIR [--dtype=bfloat16]",
             "       python -m jaxdistill <command> --help     (the command's config fields and defaults)",
             "", "commands:"]
    lines += [f"  {name:<10} {help_}" + (f"  (default config: {default})" if default else "")
              for name, (_, help_, default) in COMMANDS.items()]
    lines += ["", "Each config file's docstring shows the command that runs it. --verbose shows tracebacks."]
    return "\n".join(lines)


class CommandLineError(UserError):
    """A bad command line: unknown command, missing or unknown config, unknown key."""


def _config_argument(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(args):
            return args[i + 1]
    return None


def _load_config_file(spec: str):
    """get_config() of a config file (`path` or `path:argument`, as ml_collections accepts)."""
    path, _, argument = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    if not Path(path).is_file():
        raise CommandLineError(f"config file {path!r} does not exist; the shipped configs are "
                               f"{', '.join(default for *_, default in COMMANDS.values() if default)} (and their "
                               "neighbours under experiments/).")
    from jaxdistill.settings import config_module  # imports jax: not before a command needs it

    module = config_module(path)
    if not hasattr(module, "get_config"):
        raise CommandLineError(f"{path} has no get_config() function.")
    return module, (module.get_config(argument) if argument else module.get_config())


def _keys(config, prefix: str = "") -> list[str]:
    """Every dotted key of a (nested) ConfigDict, parents included."""
    out = []
    for name, value in config.items():
        out.append(prefix + name)
        if hasattr(value, "items") and not isinstance(value, dict):
            out += _keys(value, prefix + name + ".")
    return out


def _check_override_keys(args: list[str], config, path: str) -> None:
    known = _keys(config)
    for arg in args:
        if arg.startswith("--config.") and "=" in arg:
            key = arg[len("--config."):].split("=", 1)[0]
            if key not in known:
                close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
                hint = (" Did you mean " + " or ".join(f'"{c}"' for c in close) + "?") if close else ""
                raise CommandLineError(f"unknown config key {key!r} in {path}.{hint} "
                                       f"(`python -m jaxdistill <command> --help --config={path}` lists them all)")


def command_help(command: str, spec: str | None) -> str:
    _, help_, default = COMMANDS[command]
    spec = spec or default
    module, config = _load_config_file(spec)
    width = max(len(k) for k in _keys(config))
    lines = [f"python -m jaxdistill {command}: {help_}", "", (module.__doc__ or "").strip(), "",
             f"config fields of {spec} (override any with --config.<field>=<value>):"]
    for key in _keys(config):
        value = config
        for part in key.split("."):
            value = value[part]
        if not (hasattr(value, "items") and not isinstance(value, dict)):
            lines.append(f"  {key:<{width}} = {value!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in HELP_FLAGS:
        print(usage())
        return 0
    command, args = argv[1], argv[2:]
    verbose = "--verbose" in args
    args = [a for a in args if a != "--verbose"]
    extra = {a.split("=", 1)[0][2:]: a.split("=", 1)[1] for a in args if a.startswith(("--target=", "--out="))}
    args = [a for a in args if not a.startswith(("--target=", "--out="))]
    try:
        if command not in COMMANDS:
            close = difflib.get_close_matches(command, COMMANDS, n=1)
            raise CommandLineError(f"unknown command {command!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                                   + f". Commands: {', '.join(COMMANDS)}.")
        if command == "export":
            return export_command(args)
        spec = _config_argument(args)
        if any(a in HELP_FLAGS for a in args):
            print(command_help(command, spec))
            return 0
        if spec is None:
            raise CommandLineError(f"--config is required, e.g. --config={COMMANDS[command][2]}")
        _, base = _load_config_file(spec)
        _check_override_keys(args, base, spec)
        saved_argv, sys.argv = sys.argv, ["jaxdistill", *args]  # config_flags reads its overrides from sys.argv
        try:
            for name in [n for n in flags.FLAGS if n.startswith("config.")]:  # a previous main() call's overrides
                delattr(flags.FLAGS, name)
            flags.FLAGS.unparse_flags()
            flags.FLAGS(sys.argv)
        except flags.Error as e:
            raise CommandLineError(f"bad command line: {e}") from None
        finally:
            sys.argv = saved_argv
        module, function = COMMANDS[command][0].split(":")
        if command == "compile":
            target = extra.get("target") or _CONFIG.value.get("compile", {}).get("target")
            if not target:
                raise CommandLineError("compile needs --target=TARGET: a TPU topology (v5e:2x2, v5p:4x4x2, v6e:4x4, "
                                       "v4-8, ...) or h100:N / h200:N (presets name theirs in compile.target).")
            compile_job(_CONFIG.value, target, extra.get("out"))
        else:
            getattr(importlib.import_module(module), function)(_CONFIG.value)
        return 0
    except (UserError, FileNotFoundError, PermissionError, ValueError) as e:
        if verbose:
            traceback.print_exc()
        print(f"error: {e}" + ("" if verbose else "  (--verbose shows the traceback)"), file=sys.stderr)
        return 2


def export_command(args: list[str]) -> int:
    """`export SOURCE OUT_DIR [--dtype=D]`: positional arguments, no config file."""
    from jaxdistill.models.export import EXPORT_DTYPES, export

    if any(a in HELP_FLAGS for a in args):
        print(f"python -m jaxdistill export SOURCE OUT_DIR [--dtype={'|'.join(EXPORT_DTYPES)}] [--adapter]\n\n"
              "SOURCE: a built-in model name, a .gguf file, a Hugging Face directory or a finished training run's "
              "work directory. OUT_DIR (new, local or gs://...) becomes a Hugging Face model directory (a LoRA run's "
              "adapters merged into the weights), or with --adapter a PEFT adapter directory of a LoRA run; the dtype "
              "defaults to the source's (a run's config.dtype, float32 otherwise).")
        return 0
    options = {a.split("=", 1)[0]: a.split("=", 1)[1] if "=" in a else "" for a in args if a.startswith("--")}
    positional = [a for a in args if not a.startswith("--")]
    unknown = sorted(set(options) - {"--dtype", "--adapter"})
    if len(positional) != 2 or unknown:
        raise CommandLineError("usage: python -m jaxdistill export SOURCE OUT_DIR [--dtype=float32|bfloat16|float16] "
                               "[--adapter]" + (f" (unknown option {unknown[0]})" if unknown else ""))
    export(*positional, dtype=options.get("--dtype") or None, adapter="--adapter" in options)
    return 0


def compile_job(config, target_name: str, out: str | None = None) -> list:
    """Compile every program of the job `config` describes for `target_name`, print per-device
    memory per program, write compile.json (default: in the config's workdir); exit non-zero
    with one line if a program does not fit."""
    from jaxdistill import aot

    module = next((m for key, m in COMPILE_MODULES if key in config), None)
    if module is None:
        raise CommandLineError("compile knows train, route and teachers configs (with config.arm, config.experts or "
                               "config.teachers); this config has none of them.")
    target = aot.target(target_name)
    path = Path(out) if out else Path(config.workdir) / f"compile-{target_name.replace(':', '_')}.json"
    reports = aot.compile_all(importlib.import_module(module).programs(config, target), target, out=path)
    print(f"every program fits on {target_name}; report: {path}")
    return reports


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
