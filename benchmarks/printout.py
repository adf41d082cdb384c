"""A benchmark's printout, kept as a record that scripts/docs_tables.py renders into docs/.

Every benchmark calls its main() through `run`, so every benchmark takes `--record=PATH`: when it
finishes, PATH gets (as JSON, written atomically) the command, the commit it ran at, the machine,
the date and every line it printed; a failed run writes nothing. A doc shows the printout's
tables from the record (`<!-- table: benchmark record=PATH [table=N] -->`), so a benchmark's
numbers in docs/ are what it printed, never retyped.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from pathlib import Path


class _Tee:
    """stdout that also keeps what passes through it."""

    def __init__(self, stream):
        self.stream, self.text = stream, []

    def write(self, text):
        self.text.append(text)
        return self.stream.write(text)

    def flush(self):
        self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


def run(main) -> None:
    """Call a benchmark's main(); given `--record=PATH`, keep its printout there once main() returns.
    The flag leaves sys.argv first, so main's parser and the subprocesses it starts with its
    own arguments never see it."""
    paths = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--record=")]
    if len(paths) > 1 or "--record" in sys.argv:
        raise SystemExit("give --record once, as --record=PATH")
    sys.argv = [a for a in sys.argv if not a.startswith("--record=")]
    command = " ".join(["python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    if not paths:
        main()
        return
    from jaxdistill.runs import atomic_write_text, source_commit

    commit = source_commit()
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    try:
        main()
    finally:
        sys.stdout = tee.stream
    import jax

    record = {"command": command, "commit": commit,
              "date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}",
              "output": "".join(tee.text).splitlines()}
    path = Path(paths[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")


def tables(output: list[str]) -> list[list[str]]:
    """The markdown tables in a printout, each as its lines."""
    found, current = [], []
    for line in [*output, ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append(current)
            current = []
    return found


def table(record: dict, number: str = "1") -> str:
    """The record's `number`-th printed table (1-based), or with "all" its whole printout as a code
    block, and a line naming the run that printed it."""
    run = f"`{record['command']}` at {record['commit'][:10]}, {record['date']}, {record['machine']}."
    if number == "all":
        return "```\n$ " + record["command"] + "\n" + "\n".join(record["output"]) + "\n```\n\n" + run + "\n"
    found = tables(record["output"])
    if not number.isdigit() or not 1 <= int(number) <= len(found):
        raise ValueError(f"table={number}: `{record['command']}` printed {len(found)} table(s); give 1 to "
                         f"{len(found)}, or all")
    return "\n".join(found[int(number) - 1]) + "\n\n" + run + "\n"
