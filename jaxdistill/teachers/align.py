"""Vocabulary alignment: scoring and committing text pieces of a pivot vocabulary in every teacher.

The stack decodes in the pivot vocabulary (the student's, or the first teacher's). Each
teacher keeps its own token stream of the same text. From the tokens' exact bytes we
precompute, per teacher vocabulary:
- scoring (UniTE-style), `to_pivot[t]`: each teacher token t proposes the pivot token with
  exactly its text, or else the first pivot sub-token of its text; a pivot token's score
  under the teacher is the summed probability of the teacher tokens that propose it;
- committing, `pieces[c]`: the teacher's tokenisation of pivot token c's bytes (exact:
  decoding it gives the bytes back; bytes that are not valid UTF-8 on their own map to the
  teacher's byte tokens), so each teacher's stream decodes to exactly the committed text.
  Where the committed pivot token ends inside what would be one teacher token (Gemma's
  "Ava" committed as SmolLM2's "A", "va"), the teacher sees a split it would not have
  made itself; `split_rate` in the stack's statistics measures how often.
A decode step feeds `width` teacher tokens per pivot token; pivot tokens that need more in
some teacher are not candidates (counted in `Alignment.excluded`, reported by the command).
Special and added tokens are never candidates, except the end-of-turn token, which maps to
each teacher's own.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import weakref

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


# Per transformers tokenizer (dropped with it): its byte table, and its alignments as a teacher. Every
# stack built in one process (each teacher alone, then the stack, in the teachers command) reuses them.
_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ALIGNMENTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def token_bytes(tokenizer) -> list[bytes | None]:
    """The exact bytes of each token id; None for special tokens (control tokens with no text)."""
    if tokenizer.hf not in _TABLES:
        _TABLES[tokenizer.hf] = _token_bytes(tokenizer)
    return _TABLES[tokenizer.hf]


def _token_bytes(tokenizer) -> list[bytes | None]:
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
    to_pivot: np.ndarray  # [V_teacher] int32: the pivot token each teacher token proposes (-1: none)

    @property
    def identity(self) -> bool:
        """The teacher's vocabulary is the pivot's (scores need no mapping)."""
        return len(self.to_pivot) == len(self.lengths) and bool(
            np.all((self.to_pivot == np.arange(len(self.to_pivot))) | (self.to_pivot < 0)))

    @property
    def width(self) -> int:
        return self.pieces.shape[1]


def align(pivot, teacher, *, width: int = 2) -> Alignment:
    """Map every pivot token onto `teacher`'s vocabulary (both are our Tokenizer wrappers)."""
    if width < 1:
        raise ValueError(f"alignment width must be >= 1, got {width}.")
    # what else the tables depend on: the end-of-turn tokens (mapped onto each other) and the padding
    settings = (width, pivot.turn_end_id, teacher.turn_end_id, teacher.pad_id)
    known = _ALIGNMENTS.setdefault(teacher.hf, [])  # [(pivot's transformers tokenizer, settings, alignment)]
    for hf, same, alignment in known:
        if hf is pivot.hf and same == settings:
            return alignment
    alignment = _align(pivot, teacher, width)
    for table in (alignment.pieces, alignment.lengths, alignment.to_pivot):
        table.flags.writeable = False  # shared by every stack that reuses it
    known.append((pivot.hf, settings, alignment))
    return alignment


def _align(pivot, teacher, width: int) -> Alignment:
    pivot_bytes = token_bytes(pivot)
    if pivot.hf is teacher.hf or pivot_bytes == token_bytes(teacher):
        ids = np.arange(pivot.vocab_size, dtype=np.int32)
        lengths = np.asarray([b is not None for b in pivot_bytes], np.int32)
        pieces = ids[:, None].copy()  # one token per pivot token
        _map_end_tokens(pivot, teacher, pieces, lengths)
        return Alignment(pieces, lengths, excluded=0, to_pivot=np.where(lengths > 0, ids, -1).astype(np.int32))

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
    to_pivot = _first_pivot_tokens(pivot, pivot_bytes, teacher_bytes)
    to_pivot[teacher.turn_end_id] = pivot.turn_end_id
    return Alignment(pieces, lengths, excluded, to_pivot)


def _first_pivot_tokens(pivot, pivot_bytes, teacher_bytes) -> np.ndarray:
    """For each teacher token: the pivot token with exactly its bytes, else the first pivot
    token of its text (the longest pivot token its bytes start with); -1 for special tokens."""
    exact = {b: c for c, b in enumerate(pivot_bytes) if b is not None}
    pivot_byte_ids = byte_token_ids(pivot, pivot_bytes)
    out = np.full(len(teacher_bytes), -1, np.int32)
    texts, where = [], []
    for t, b in enumerate(teacher_bytes):
        if b is None:
            continue
        if b in exact:
            out[t] = exact[b]
            continue
        try:
            texts.append(b.decode("utf-8"))
            where.append(t)
        except UnicodeDecodeError:
            out[t] = pivot_byte_ids.get(b[0], -1)
    for t, ids in zip(where, pivot.hf(texts, add_special_tokens=False)["input_ids"], strict=True):
        first = ids[0] if ids else -1
        ok = first >= 0 and pivot_bytes[first] is not None and teacher_bytes[t].startswith(pivot_bytes[first])
        out[t] = first if ok else pivot_byte_ids.get(teacher_bytes[t][0], -1)
    return out


def _map_end_tokens(pivot, teacher, pieces, lengths) -> None:
    """The pivot's end-of-turn token is each teacher's end-of-turn token; other specials stay out."""
    pieces[pivot.turn_end_id, 0] = teacher.turn_end_id
    lengths[pivot.turn_end_id] = 1


def candidates(alignments: list[Alignment]) -> np.ndarray:
    """[V_pivot] bool: tokens every teacher can score and commit."""
    return np.logical_and.reduce([a.lengths > 0 for a in alignments])
