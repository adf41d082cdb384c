"""Synthetic conversations: the non-verifiable case of self-distillation.

A user asks for something, gets a first reply, then asks for a revision under explicit
constraints ("exactly 4 items, numbered, in alphabetical order"; "at most 8 words, in
capital letters, ending with '!'"; "sorted from largest to smallest, separated by ' | '").
The reply the user accepts is the record's solution: the teacher's hint. There is no exact
answer; instead each record carries its constraints as `checks`, which evaluation applies to
the student's reply (`eval.metrics.passes_checks`) and training never sees.
"""

from __future__ import annotations

import zlib

import numpy as np

from jaxdistill.data.records import Record

CATEGORIES = {
    "fruits": ["apple", "banana", "cherry", "grape", "kiwi", "lemon", "mango", "orange", "peach", "pear", "plum"],
    "animals": ["bear", "cat", "dog", "eagle", "fox", "horse", "lion", "mouse", "otter", "rabbit", "tiger", "wolf"],
    "colors": ["black", "blue", "brown", "gray", "green", "orange", "pink", "purple", "red", "white", "yellow"],
    "tools": ["axe", "drill", "file", "hammer", "ladder", "pliers", "rake", "saw", "shovel", "wrench"],
}
TOPICS = {  # topic: (a first sentence, the words a short rewrite keeps)
    "the sea": ("The sea is calm and blue in the early morning light.", "the sea is calm and blue"),
    "the city": ("The city never sleeps and its streets are always busy.", "the city never sleeps"),
    "the forest": ("The forest is quiet, green and full of old trees.", "the forest is quiet and green"),
    "winter": ("Winter brings cold winds, short days and deep snow.", "winter brings cold winds"),
    "the moon": ("The moon shines bright over the sleeping town tonight.", "the moon shines bright"),
    "coffee": ("Coffee wakes me up and makes the morning feel easier.", "coffee wakes me up"),
}


def _list_revision(rng: np.random.Generator) -> tuple[list[tuple[str, str]], str, str, tuple]:
    category = str(rng.choice(sorted(CATEGORIES)))
    words = CATEGORIES[category]
    first = [str(w) for w in rng.choice(words, size=int(rng.integers(3, 6)), replace=False)]
    n = int(rng.integers(3, 6))
    items = sorted((first + [w for w in rng.permutation(words) if w not in first])[:n])  # the first reply, revised
    history = [("user", f"List a few {category}."), ("assistant", ", ".join(first) + ".")]
    request = f"Make it exactly {n} {category}, one per line, numbered, in alphabetical order."
    reply = "\n".join(f"{i}. {item}" for i, item in enumerate(items, 1))
    checks = (("line_count", str(n)), ("numbered", ""), ("alphabetical", ""), ("items_from", category))
    return history, request, reply, checks


def _rewrite(rng: np.random.Generator) -> tuple[list[tuple[str, str]], str, str, tuple]:
    topic = str(rng.choice(sorted(TOPICS)))
    sentence, keep = TOPICS[topic][0], TOPICS[topic][1].split()
    k = len(keep) + int(rng.integers(0, 3))
    shout = bool(rng.integers(0, 2))
    history = [("user", f"Write one sentence about {topic}."), ("assistant", sentence)]
    if shout:
        request = f"Rewrite it in at most {k} words, all in capital letters, ending with an exclamation mark."
        reply = " ".join(keep).upper() + "!"
        checks = (("max_words", str(k)), ("uppercase", ""), ("ends_with", "!"), ("contains", keep[1]))
    else:
        request = f"Rewrite it in at most {k} words, all in lowercase, ending with a period."
        reply = " ".join(keep).lower() + "."
        checks = (("max_words", str(k)), ("lowercase", ""), ("ends_with", "."), ("contains", keep[1]))
    return history, request, reply, checks


def _number_format(rng: np.random.Generator) -> tuple[list[tuple[str, str]], str, str, tuple]:
    numbers = [int(x) for x in rng.choice(np.arange(1, 60), size=int(rng.integers(3, 6)), replace=False)]
    shown = ", ".join(map(str, numbers))
    history = [("user", f"Here are some numbers: {shown}. What is their sum?"),
               ("assistant", f"The sum is {sum(numbers)}.")]
    request = "Now write only the numbers, sorted from largest to smallest, separated by ' | '."
    reply = " | ".join(map(str, sorted(numbers, reverse=True)))
    checks = (("sorted_numbers", ",".join(map(str, numbers))), ("separator", "|"))
    return history, request, reply, checks


FAMILIES = {"list": _list_revision, "rewrite": _rewrite, "numbers": _number_format}


def conversation_records(count: int, seed: int, split: str = "train") -> list[Record]:
    """`count` conversations, the families in turn. A conversation belongs to the test split
    when the hash of its text falls in one quarter, so the splits never share a conversation
    (a family with few variants repeats within a split, never across)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    records, names = [], sorted(FAMILIES)
    while len(records) < count:
        history, request, reply, checks = FAMILIES[names[len(records) % len(names)]](rng)
        record = Record(uid=f"conversation-{split}-{len(records)}", problem=request, solution=reply,
                        history=tuple(history), checks=checks)
        if is_test(record) == (split == "test"):
            records.append(record)
    return records


def is_test(record: Record) -> bool:
    text = " ".join(t for _, t in record.history) + "\n" + record.problem + "\n" + record.solution
    return zlib.crc32(text.encode()) % 4 == 0
