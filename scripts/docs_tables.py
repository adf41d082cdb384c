"""The results tables in docs/, regenerated from the committed records they report.

    python scripts/docs_tables.py            # rewrite every generated table in docs/*.md
    python scripts/docs_tables.py --check    # exit 1, naming each table its records no longer give (CI)

A generated table sits between two markers that name its generator and arguments:

    <!-- table: grid task=math arms=sft,blend seeds=0,1,2 -->
    ...
    <!-- /table -->

Generators: `grid` (experiments/self_distill/grid.py's held-out table of one task, from
docs/results/grid/ or records=DIR), `grid-compare` (each arm minus a baseline, paired, with the noise floor),
`grid-end-gap` (the target's p(end) against the student's where training samples end, per arm),
`end-push`, `hint-content` and `decode-noise` (experiments/self_distill/'s end_push.py, hint_content.py and
decode_noise.py, record=PATH),
`teachers` (a teachers run's
results.json, record=PATH: every arm against the best single teacher and the oracle; part=diversity: the
teachers' agreement on the reference solutions), `router`,
`router-sweep` and `router-families` (a route run's results.json, record=PATH: the methods at the default
alpha, the alpha sweep, per task family), `pruning` (a prune run's results.json, record=PATH,
part=held-out|return|matched: the methods on the held-out trees, return per price, the search against
best-of-N at matched tokens), `traces-sft` (experiments/teachers/traces_sft.py's results.json,
record=PATH), `benchmark` (a benchmark's printout kept with --record=PATH, docs/benchmarks/*.json;
table=N picks its N-th table, table=all shows it whole), `scale-compile` and
`scale-lora` (scripts/scale_table.py, from docs/scale/compile/). Every other table says what it is in
a comment just above it (or above its code block): `<!-- transcript, records lost: ... -->` (typed from
a run whose directory is gone), `<!-- transcript, benchmark output: ... -->` (a benchmark's printout
from before benchmarks kept records, command beside it) or `<!-- transcript, reference: ... -->` (no
measurements). `--check` also fails on a table with none of these, so a new typed table cannot slip in.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"(<!-- table: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def generate(spec: str) -> str:
    """The table a marker's spec (`GENERATOR key=value ...`) gives from today's records."""
    name, *pairs = spec.split()
    args = dict(pair.split("=", 1) for pair in pairs)
    if name in ("grid", "grid-compare", "grid-end-gap"):
        grid = _module(ROOT / "experiments/self_distill/grid.py")
        records = ROOT / args.get("records", "docs/results/grid")
        seeds = [int(s) for s in args["seeds"].split(",")]
        if name == "grid":
            return grid.task_table(records, args["task"], args["arms"].split(","), seeds)
        if name == "grid-end-gap":
            return grid.end_gap_table(records, args["arms"].split(","), seeds)
        return grid.compare_table(records, args["baseline"], args["arms"].split(","), seeds)
    if name == "end-push":
        end_push = _module(ROOT / "experiments/self_distill/end_push.py")
        return end_push.table(json.loads((ROOT / args["record"]).read_text()))
    if name == "decode-noise":
        decode_noise = _module(ROOT / "experiments/self_distill/decode_noise.py")
        return decode_noise.table(json.loads((ROOT / args["record"]).read_text()))
    if name == "hint-content":
        hint_content = _module(ROOT / "experiments/self_distill/hint_content.py")
        return hint_content.table(json.loads((ROOT / args["record"]).read_text()))
    if name == "teachers":
        from jaxdistill.teachers import evaluate

        render = evaluate.diversity_table if args.get("part") == "diversity" else evaluate.comparison_table
        return render(json.loads((ROOT / args["record"]).read_text()))
    if name in ("router", "router-sweep", "router-families"):
        from jaxdistill.router import evaluate as router_eval

        render = {"router": router_eval.default_table, "router-sweep": router_eval.sweep_table,
                  "router-families": router_eval.family_table}[name]
        return render(json.loads((ROOT / args["record"]).read_text()))
    if name == "pruning":
        from jaxdistill.teachers import pruning

        render = {"held-out": pruning.held_out_table, "return": pruning.return_table,
                  "matched": pruning.matched_table}[args["part"]]
        return render(json.loads((ROOT / args["record"]).read_text()))
    if name == "traces-sft":
        traces_sft = _module(ROOT / "experiments/teachers/traces_sft.py")
        return traces_sft.table(json.loads((ROOT / args["record"]).read_text()))
    if name == "benchmark":
        printout = _module(ROOT / "benchmarks/printout.py")
        return printout.table(json.loads((ROOT / args["record"]).read_text()), args.get("table", "1"))
    if name in ("scale-compile", "scale-lora"):
        scale_table = _module(ROOT / "scripts/scale_table.py")
        return scale_table.compile_block() if name == "scale-compile" else scale_table.lora_block()
    raise SystemExit(f"unknown table generator {name!r} in a docs marker; known: grid, grid-compare, grid-end-gap, "
                     "end-push, hint-content, decode-noise, teachers, router, router-sweep, router-families, "
                     "pruning, traces-sft, benchmark, scale-compile, scale-lora")


def unmarked_tables(text: str) -> list[int]:
    """Line numbers (1-based) of tables neither generated nor marked as a transcript within the
    12 lines above them."""
    lines, inside, found = text.splitlines(), False, []
    for i, line in enumerate(lines):
        inside = (inside or line.startswith("<!-- table:")) and not line.startswith("<!-- /table")
        is_table = line.startswith("|") and i + 1 < len(lines) and re.match(r"\|\s*:?-{3}", lines[i + 1])
        if is_table and not inside and not any(above.startswith(("<!-- transcript", "<!-- table:"))
                                               for above in lines[max(0, i - 12):i]):
            found.append(i + 1)
    return found


def regenerate(text: str) -> tuple[str, list[tuple[str, str, str]]]:
    """The doc with every marked table regenerated, and (spec, old, new) for each that changed."""
    changed = []

    def one(match: re.Match) -> str:
        new = generate(match["spec"]).rstrip("\n") + "\n"
        if new != match["body"]:
            changed.append((match["spec"], match["body"], new))
        return match.group(1) + new + match.group(4)

    return BLOCK.sub(one, text), changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs")
    parser.add_argument("docs", nargs="*", type=Path, default=DOCS)
    args = parser.parse_args(argv)
    stale = 0
    for doc in args.docs:
        text = doc.read_text()
        new, changed = regenerate(text)
        for spec, old, fresh in changed:
            stale += 1
            print(f"{doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc}: table `{spec}` differs from "
                  "its records:")
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), fresh.splitlines(True), "doc",
                                                       "records", n=0))
        if changed and not args.check:
            doc.write_text(new)
        for line in unmarked_tables(text):
            stale += 1
            print(f"{doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc}:{line}: a table neither generated "
                  "from records (<!-- table: ... -->) nor marked as a transcript (<!-- transcript, ...: why -->)")
    if args.check and stale:
        print(f"{stale} table(s) out of date or unmarked: run `python scripts/docs_tables.py` and commit the docs, "
              "or mark a typed table as a transcript.")
        return 1
    print(f"{'checked' if args.check else 'rewrote'} the tables of {len(args.docs)} docs; "
          f"{stale} {'differ' if args.check else 'changed'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
