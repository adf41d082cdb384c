"""Checks every command runs on its settings before any work: nothing set is silently ignored,
and a work directory is never continued under settings that change its results.

- `check_unused(config, rules)`: a setting changed from its unset value that the chosen
  source, arm or kind does not read is an error naming it and what would read it. Each system
  lists its `Unused` rules beside its `validate`.
- `check_resume(workdir, config)`: the first start stores the resolved config in
  `workdir/config.json`; a later start on a work directory holding results compares with it
  and refuses, listing each differing key (old -> new), unless every difference is in
  `HARMLESS` or the user passes `--config.resume=ignore_config_changes` (the deliberate case,
  e.g. more steps), which `run_in_workdir` records in summary.md.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence

from jaxdistill import runs
from jaxdistill.errors import ConfigError, RunError

RESUME_CHOICES = ("", "ignore_config_changes")
# Settings that cannot change a run's results (logging, batching of evaluation, checkpoint
# cadence, where the work goes, how processes start, compile-only sizes), per key or prefix.
HARMLESS = ("workdir", "resume", "eval.batch_size", "checkpoint.every", "checkpoint.keep", "checkpoint.resume_from",
            "distributed.", "compile.", "log.", "precompute.host", "precompute.num_hosts", "precompute.batch_size",
            "precompute.chunk", "precompute.dir")


@dataclasses.dataclass(frozen=True)
class Unused:
    """`key` counts only when `reads(config)`; `unset` is its value when nobody set it;
    `fix(config)` says what would make it count (shown after "but")."""

    key: str
    unset: object
    reads: Callable
    fix: Callable


def get(config, key: str):
    """The value at a dotted key (None where any part is missing)."""
    value = config
    for part in key.split("."):
        value = value.get(part) if hasattr(value, "get") else None
    return value


def config_module(path):
    """The config file at `path`, executed as a module (its `get_config()` and docstring)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("jaxdistill_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sibling_config(here: str, name: str):
    """`get_config()` of the config file `name` beside `here` (a config file's `__file__`): how
    presets build on each other without being importable modules."""
    from pathlib import Path

    return config_module(Path(here).with_name(name)).get_config()


def check_unused(config, rules: Sequence[Unused]) -> None:
    for rule in rules:
        value = get(config, rule.key)
        if value is not None and value != rule.unset and not rule.reads(config):
            raise ConfigError(f"{rule.key} is set ({value!r}) but {rule.fix(config)}.")


def flatten(tree, prefix: str = "") -> dict:
    """{dotted key: leaf} of nested dicts (lists and tuples are leaves)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def _plain(config) -> dict:
    """The config as JSON would give it back (tuples as lists), so stored and new compare equal."""
    return json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else dict(config)))


def harmless(key: str) -> bool:
    return any(key == h or (h.endswith(".") and key.startswith(h)) for h in HARMLESS)


def config_changes(old: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, old, new) for every result-changing setting that differs ("<absent>" where missing)."""
    old, new = flatten(old), flatten(new)
    absent = "<absent>"
    return [(k, old.get(k, absent), new.get(k, absent)) for k in sorted(set(old) | set(new))
            if old.get(k, absent) != new.get(k, absent) and not harmless(k)]


def check_resume(workdir, config) -> list[str]:
    """Store the config at the first start; on a resume, refuse changed results-changing settings
    (see the module docstring). Returns the accepted changes as "key: old -> new" lines (empty
    unless resume=ignore_config_changes let them through)."""
    choice = config.get("resume", "")
    if choice not in RESUME_CHOICES:
        raise ConfigError(f"resume must be one of {RESUME_CHOICES}, got {choice!r}.")
    path = workdir / "config.json"
    new = _plain(config)
    # a start that left nothing behind (refused data, say) made no run to protect: start afresh
    results = [p for p in workdir.iterdir() if p.name != "config.json" and not p.name.startswith(".")]
    if not path.exists() or not results:
        if runs.is_writer():
            runs.atomic_write_text(path, json.dumps(new, indent=1))
        return []
    changes = config_changes(json.loads(path.read_text()), new)
    lines = [f"{key}: {old!r} -> {value!r}" for key, old, value in changes]
    if changes and choice != "ignore_config_changes":
        raise RunError(f"{workdir} holds a run made with other settings ({'; '.join(lines)}). Use a new "
                       "--config.workdir, or --config.resume=ignore_config_changes to continue this run "
                       "deliberately (the summary records the changes).")
    return lines


def run_in_workdir(config, body: Callable):
    """What every command does around its work: open the work directory, hold its lock, check
    the settings against the run already there (`check_resume`), then `body(config, workdir)`.
    Changes accepted with resume=ignore_config_changes are appended to workdir/summary.md."""
    workdir = runs.open_workdir(config.workdir)
    with runs.WorkdirLock(workdir):
        changes = check_resume(workdir, config)
        if changes:
            print("continuing with changed settings (resume=ignore_config_changes): " + "; ".join(changes))
        result = body(config, workdir)
        if changes and runs.is_writer():
            summary = workdir / "summary.md"
            text = summary.read_text() if summary.exists() else ""
            runs.atomic_write_text(summary, text + "\nContinued with changed settings (resume=ignore_config_changes): "
                                   + "; ".join(changes) + "\n")
    return result
