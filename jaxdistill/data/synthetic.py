"""Synthetic verifiable word problems with step-by-step reference solutions: the embedded default.

Each problem starts from a count and applies `steps` operations (buy/find: +, give/eat: -,
doubling/tripling: x). Knobs: number of steps, size of the numbers, which operations.
Everything is drawn from a seeded generator, so a (seed, index) pair names one problem.

Train and test splits draw from separate random streams, and the train split also skips every
problem whose text is among the first `held_out` (default TEST_WINDOW) problems of the test split:
small problem spaces repeat, and an evaluation set must share no problem with training data.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from jaxdistill.data.records import Record

NAMES = ("Mia", "Liam", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Iris", "Tom", "Sara", "Kai")
ITEMS = ("apples", "marbles", "stickers", "books", "coins", "shells", "pencils", "cards")
TEST_WINDOW = 1024  # the train split avoids the first this many test problems (any evaluation set up to it)


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    steps: int = 2  # operations after the starting count
    max_start: int = 20
    max_operand: int = 12
    ops: tuple[str, ...] = ("add", "sub", "mul")

    def __post_init__(self):
        unknown = set(self.ops) - {"add", "sub", "mul"}
        if unknown or not self.ops:
            raise ValueError(f"ops must be a non-empty subset of ('add', 'sub', 'mul'), got {self.ops}.")
        if self.steps < 1 or self.max_start < 2 or self.max_operand < 2:
            raise ValueError("steps must be >= 1, max_start and max_operand >= 2.")


def make_problem(rng: np.random.Generator, config: SyntheticConfig, uid: str) -> Record:
    name, items = NAMES[rng.integers(len(NAMES))], ITEMS[rng.integers(len(ITEMS))]
    value = int(rng.integers(2, config.max_start + 1))
    story = [f"{name} has {value} {items}."]
    solution = [f"{name} starts with {value} {items}."]
    for _ in range(config.steps):
        op = config.ops[rng.integers(len(config.ops))]
        if op == "sub" and value < 2:
            op = "add"
        if op == "add":
            b = int(rng.integers(1, config.max_operand + 1))
            verb = ("buys", "finds", "gets")[rng.integers(3)]
            story.append(f"Then {name} {verb} {b} more.")
            solution.append(f"After {name} {verb} {b} more: {value} + {b} = {value + b}.")
            value += b
        elif op == "sub":
            b = int(rng.integers(1, min(value, config.max_operand + 1)))
            verb = ("gives away", "loses", "uses")[rng.integers(3)]
            story.append(f"Then {name} {verb} {b}.")
            solution.append(f"After {name} {verb} {b}: {value} - {b} = {value - b}.")
            value -= b
        else:
            factor = int(rng.integers(2, 4))
            word = {2: "doubles", 3: "triples"}[factor]
            story.append(f"Then the number of {items} {word}.")
            solution.append(f"After it {word}: {value} x {factor} = {value * factor}.")
            value *= factor
    story.append(f"How many {items} does {name} have now?")
    solution.append(f"#### {value}")
    return Record(uid=uid, problem=" ".join(story), solution="\n".join(solution), answer=str(value))


def synthetic_records(count: int, seed: int, config: SyntheticConfig = SyntheticConfig(),
                      split: str = "train", held_out: int = TEST_WINDOW) -> list[Record]:
    """`count` problems of a split. Test: the first `count` draws of its stream. Train: draws of its
    own stream, skipping any problem among the first `held_out` test problems (uids keep the draw index)."""
    rng = np.random.default_rng([seed, {"train": 0, "test": 1}[split]])
    if split == "test":
        return [make_problem(rng, config, f"synthetic-test-{seed}-{i}") for i in range(count)]
    exclude, records, draws = _test_problems(seed, config, held_out), [], 0
    while len(records) < count:
        if draws > 10 * count + 10_000:
            raise ValueError(f"cannot draw {count} training problems outside the first {held_out} test problems: the "
                             "problem space is too small; raise max_start, max_operand or steps.")
        record = make_problem(rng, config, f"synthetic-train-{seed}-{draws}")
        draws += 1
        if record.problem not in exclude:
            records.append(record)
    return records


@functools.lru_cache(maxsize=8)
def _test_problems(seed: int, config: SyntheticConfig, count: int) -> frozenset[str]:
    return frozenset(r.problem for r in synthetic_records(count, seed, config, "test"))
