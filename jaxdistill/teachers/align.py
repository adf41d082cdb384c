"""Vocabulary alignment: scoring and committing text pieces of a pivot vocabulary in every teacher.

The stack decodes in the pivot vocabulary (the student's, or the first teacher's). Each
teacher keeps its own token stream of the same text. For every pivot token c we precompute,
per teacher vocabulary (UniTE-style, from the token's exact bytes):
- `pieces[c]`: the teacher's tokenisation of c's bytes (exact: decoding it gives the bytes
  back; bytes that are not valid UTF-8 on their own map to the teacher's byte tokens), so a
  committed pivot token never corrupts a teacher's stream, whatever its token boundaries;
- `first[c] = pieces[c][0]`: the teacher's probability of c is that of its first sub-token
  (exact when c's text is one teacher token: exact string matching with first-sub-token
  fallback).
A decode step feeds `width` teacher tokens per pivot token; pivot tokens that need more in
some teacher are not candidates (counted in `Alignment.excluded`, reported by the command).
Special and added tokens are never candidates, except the end-of-turn token, which maps to
each teacher's own.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2 byte-level BPE writes each byte as one printable character; char -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, shifted = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + shifted)] = b
            shifted += 1
    return chars


def _is_byte_level(tokenizer) -> bool:
    return "ByteLevel" in str(tokenizer.hf.backend_tokenizer.decoder)


def token_bytes(tokenizer) -> list[bytes | None]:
    """The exact bytes of each token id; None for special tokens (control tokens with no text)."""
    hf = tokenizer.hf
    special = {i for i, t in hf.added_tokens_decoder.items() if t.special} | set(hf.all_special_ids)
    strings = hf.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
    alphabet = _byte_level_alphabet() if _is_byte_level(tokenizer) else None
    out: list[bytes | None] = []
    for i, s in enumerate(strings):
        if i in special or s is None:
            out.append(None)
        elif alphabet is not None:
            out.append(bytes(alphabet[ch] for ch in s) if all(ch in alphabet for ch in s) else None)
        elif match := _BYTE_TOKEN.match(s):
            out.append(bytes([int(match.group(1), 16)]))
        else:  # SentencePiece: "▁" is a space
            out.append(s.replace("▁", " ").encode("utf-8"))
    return out


def byte_token_ids(tokenizer, table: list[bytes | None]) -> dict[int, int]:
    """byte value -> the id of the token that is exactly that byte (byte fallback / byte-level)."""
    ids = {}
    for i, b in enumerate(table):
        if b is not None and len(b) == 1 and b[0] not in ids:
            ids[b[0]] = i
    return ids


@dataclasses.dataclass(frozen=True)
class Alignment:
    """Pivot vocabulary -> one teacher's vocabulary."""

    pieces: np.ndarray  # [V_pivot, width] int32, padded with the teacher's pad id
    lengths: np.ndarray  # [V_pivot] int32: real tokens in each piece (0: not a candidate)
    excluded: int  # pivot tokens with text that need more than `width` teacher tokens

    @property
    def first(self) -> np.ndarray:
        return self.pieces[:, 0]

    @property
    def width(self) -> int:
        return self.pieces.shape[1]


def align(pivot, teacher, *, width: int = 2) -> Alignment:
    """Map every pivot token onto `teacher`'s vocabulary (both are our Tokenizer wrappers)."""
    if width < 1:
        raise ValueError(f"alignment width must be >= 1, got {width}.")
    pivot_bytes = token_bytes(pivot)
    if pivot.hf is teacher.hf or pivot_bytes == token_bytes(teacher):
        ids = np.arange(pivot.vocab_size, dtype=np.int32)
        lengths = np.asarray([b is not None for b in pivot_bytes], np.int32)
        pieces = np.full((pivot.vocab_size, width), teacher.pad_id, np.int32)
        pieces[:, 0] = ids
        _map_end_tokens(pivot, teacher, pieces, lengths)
        return Alignment(pieces, lengths, excluded=0)

    teacher_bytes = token_bytes(teacher)
    byte_ids = byte_token_ids(teacher, teacher_bytes)
    texts, encodable = [], []
    for c, b in enumerate(pivot_bytes):
        if b is None:
            continue
        try:
            texts.append(b.decode("utf-8"))
            encodable.append(c)
        except UnicodeDecodeError:
            pass
    encoded = dict(zip(encodable, teacher.hf(texts, add_special_tokens=False)["input_ids"], strict=True))
    pieces = np.full((pivot.vocab_size, width), teacher.pad_id, np.int32)
    lengths = np.zeros(pivot.vocab_size, np.int32)
    excluded = 0
    for c, b in enumerate(pivot_bytes):
        if b is None:
            continue
        ids = encoded.get(c)
        if ids is None or b"".join(teacher_bytes[i] or b"" for i in ids) != b:  # not valid text alone: bytes
            if not all(x in byte_ids for x in b):
                excluded += 1
                continue
            ids = [byte_ids[x] for x in b]
        if len(ids) > width:
            excluded += 1
            continue
        pieces[c, : len(ids)] = ids
        lengths[c] = len(ids)
    _map_end_tokens(pivot, teacher, pieces, lengths)
    return Alignment(pieces, lengths, excluded)


def _map_end_tokens(pivot, teacher, pieces, lengths) -> None:
    """The pivot's end-of-turn token is each teacher's end-of-turn token; other specials stay out."""
    pieces[pivot.turn_end_id, 0] = teacher.turn_end_id
    lengths[pivot.turn_end_id] = 1


def candidates(alignments: list[Alignment]) -> np.ndarray:
    """[V_pivot] bool: tokens every teacher can score and commit."""
    return np.logical_and.reduce([a.lengths > 0 for a in alignments])
