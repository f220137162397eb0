"""A corpus prepared once: its token ids as a compact array in the cache, memory-mapped by every
job, restart and rank that uses it afterwards (nanoGPT's ``prepare.py`` and ``np.memmap``).

Preparing streams the file in chunks and tokenises each with array operations, so time and
memory do not depend on Python objects per character; the result is the chapter's tokens,
vocabulary and ids exactly. The ids take one byte while the vocabulary has at most 256 entries,
two up to 32,768, else four.

A prepared corpus is a directory keyed by the file's sha1, the preprocessing and ``min_freq``,
written under another name and renamed into place when complete: a job killed half-way leaves
only a ``.part`` directory, which nothing reads and the next preparation removes. A lock file
makes a second job (or rank) wait for the first instead of preparing it again; where a shared
volume does not honour locks, both prepare and the rename keeps one whole copy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import mmap
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import torch
from torch import Tensor

from rnnlm.errors import FlagError
from rnnlm.vocab import UNK, Vocab

log = logging.getLogger(__name__)

FORMAT = 1  # part of the directory name: a new layout never reads an old one
CHUNK_CHARS = 1 << 22
_IDS, _VOCAB, _META = "ids.bin", "vocab.json", "meta.json"
_CODE_POINTS = 0x110000
# What the d2l preprocessing carries from one chunk to the next, as the text that recreates it.
_LINE_START, _AFTER_LETTER, _AFTER_GAP = "\n", "a", "a "


@dataclass(frozen=True)
class PreparedCorpus:
    vocab: Vocab
    ids: Tensor  # (N,) every token's id, memory-mapped: pages are read when used, and shared
    directory: Path
    mapping: np.memmap

    def unmap_pages(self) -> None:
        """Unmap the pages read so far from this process (they stay in the page cache, shared,
        and come back on the next read): a rank's resident memory then holds the minibatches in
        use, not every page it ever read (the kernel maps whole folios, up to 2 MB a read)."""
        mapped = getattr(self.mapping, "_mmap", None)  # numpy's, of this file
        if isinstance(mapped, mmap.mmap):
            mapped.madvise(mmap.MADV_DONTNEED)  # never written: pages refault from the file


def prepare(
    path: Path, sha1: str, preprocess: str, min_freq: int, cache_dir: Path
) -> PreparedCorpus:
    """The prepared corpus of ``path`` (whose sha1 is ``sha1``), made if the cache lacks it."""
    target = cache_dir / "prepared" / f"{sha1}-{preprocess}-min{min_freq}-v{FORMAT}"
    if not (target / _META).is_file():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            lock = open(target.with_name(target.name + ".lock"), "a")  # noqa: SIM115
        except OSError as exc:
            raise _unwritable(target.parent, exc) from None
        with lock, _locked(lock):
            if not (target / _META).is_file():  # not made while this job waited
                _write(path, preprocess, min_freq, target)
    return load(target)


def load(directory: Path) -> PreparedCorpus:
    meta = json.loads((directory / _META).read_text())
    # Copy-on-write: writable for torch, yet never written; the pages stay the page cache's.
    ids = np.memmap(directory / _IDS, dtype=np.dtype(meta["dtype"]), mode="c",
                    shape=(meta["num_tokens"],))  # fmt: skip
    return PreparedCorpus(Vocab.load(directory / _VOCAB), torch.from_numpy(ids), directory, ids)


@contextlib.contextmanager
def _locked(lock: IO[str]) -> Iterator[None]:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("waiting for another job preparing the corpus (%s)", Path(lock.name).parent)
        fcntl.flock(lock, fcntl.LOCK_EX)
    yield  # the lock goes with the file descriptor, also when the process is killed


def _unwritable(directory: Path, exc: OSError) -> FlagError:
    return FlagError("--cache-dir", f"cannot prepare the corpus in {directory} "
                     f"({exc.strerror}); pass a writable --cache-dir.")  # fmt: skip


def _write(path: Path, preprocess: str, min_freq: int, target: Path) -> None:
    for stale in target.parent.glob(f".{target.name}.*.part"):  # left by a killed preparation
        shutil.rmtree(stale, ignore_errors=True)
    part = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    part.mkdir()
    try:
        started = time.perf_counter()
        vocab, dtype, num_tokens = _encode(path, preprocess, min_freq, part / _IDS)
        if num_tokens == 0:
            hint = " (letters only); try --preprocess raw" if preprocess == "d2l" else ""
            raise FlagError(
                "--corpus", f"{path} holds no tokens after {preprocess} preprocessing{hint}."
            )
        vocab.save(part / _VOCAB)
        meta = {"dtype": dtype.name, "num_tokens": num_tokens, "source": str(path)}
        (part / _META).write_text(json.dumps(meta))  # last: a directory with it is whole
        os.rename(part, target)
        seconds = time.perf_counter() - started
        size = path.stat().st_size / 1e6
        log.info("prepared %s: %d tokens, vocabulary %d, %.1f s (%.0f MB/s)",
                 path.name, num_tokens, len(vocab), seconds, size / seconds)  # fmt: skip
    except OSError as exc:
        if (target / _META).is_file():  # another job's copy won the rename: the same bytes
            return
        raise _unwritable(target.parent, exc) from None
    finally:
        shutil.rmtree(part, ignore_errors=True)


def _encode(path: Path, preprocess: str, min_freq: int, out: Path) -> tuple[Vocab, np.dtype, int]:
    """Write the ids of ``path``'s tokens to ``out``; return the vocabulary, the ids' dtype and
    the token count. The first pass counts and writes provisional ids; the second renumbers them
    in the vocabulary's order (by frequency, ties in first-seen order)."""
    provisional = out.with_suffix(".provisional")
    for dtype in _DTYPES:  # more distinct characters than the dtype holds: again, wider
        try:
            first = _first_pass(path, preprocess, dtype, provisional)
            break
        except _TooNarrow:
            continue
    counts = first.counts
    by_freq = sorted(first.seen, key=lambda t: -counts[t])  # stable: ties keep first-seen order
    vocab = Vocab([UNK, *(chr(t) for t in by_freq if counts[t] >= max(min_freq, 1))])
    final = next(d for d in _DTYPES if len(vocab) - 1 <= np.iinfo(d).max)
    renumber = np.zeros(_ASCII + len(first.wide), dtype=final)  # provisional id -> id
    for provisional_id, t in [*((t, t) for t in range(_ASCII)), *enumerate(first.wide, _ASCII)]:
        renumber[provisional_id] = vocab.token_to_idx.get(chr(t), 0)
    byte_table = renumber.tobytes().ljust(256, b"\0") if dtype == final == _DTYPES[0] else None
    with open(provisional, "rb") as src, open(out, "wb") as dst:
        while chunk := src.read(CHUNK_CHARS * dtype.itemsize):
            if byte_table is not None:  # one byte to one byte: bytes.translate is fastest
                dst.write(chunk.translate(byte_table))
            else:
                dst.write(np.take(renumber, np.frombuffer(chunk, dtype=dtype)).data)
    provisional.unlink()
    return vocab, final, first.num_tokens


_ASCII = 128
_DTYPES = (np.dtype(np.uint8), np.dtype(np.int16), np.dtype(np.int32))


class _TooNarrow(Exception):
    pass


@dataclass
class _FirstPass:
    seen: list[int] = dataclasses.field(default_factory=list)  # code points, first-seen order
    wide: list[int] = dataclasses.field(default_factory=list)  # the non-ASCII ones among them
    counts: np.ndarray = dataclasses.field(
        default_factory=lambda: np.zeros(_CODE_POINTS, dtype=np.int64)
    )
    num_tokens: int = 0


def _first_pass(path: Path, preprocess: str, dtype: np.dtype, out: Path) -> _FirstPass:
    """Count the tokens and write provisional ids: an ASCII character's code point (so most
    text needs no lookup), another's 128 + its place among the non-ASCII ones."""
    first = _FirstPass()
    provisional = np.zeros(_CODE_POINTS, dtype=dtype)
    provisional[:_ASCII] = np.arange(_ASCII)
    with open(out, "wb") as f:
        for tokens in tokenize(path, preprocess):
            wide = tokens.dtype != np.uint8
            as_torch = torch.from_numpy(tokens.astype(np.int64) if wide else tokens)
            chunk_counts = torch.bincount(as_torch, minlength=_ASCII).numpy()
            seen_before = first.counts[: len(chunk_counts)] > 0
            new = np.flatnonzero((chunk_counts > 0) & ~seen_before)
            for t in new[np.argsort([int(np.argmax(tokens == t)) for t in new])]:
                first.seen.append(int(t))
                if t >= _ASCII:
                    if _ASCII + len(first.wide) > np.iinfo(dtype).max:
                        raise _TooNarrow
                    provisional[t] = _ASCII + len(first.wide)
                    first.wide.append(int(t))
            first.counts[: len(chunk_counts)] += chunk_counts
            ids = np.take(provisional, tokens) if wide else tokens.astype(dtype, copy=False)
            f.write(np.ascontiguousarray(ids).data)
            first.num_tokens += len(tokens)
    return first


def tokenize(path: Path, preprocess: str) -> Iterator[np.ndarray]:
    """The tokens of ``path`` as arrays of Unicode code points, a chunk at a time.

    ``d2l``: per line, every run of non-letters becomes one space, then strip and lowercase;
    lines are joined with no separator (the chapter's ``re.sub('[^A-Za-z]+', ' ', line)
    .strip().lower()`` over ``readlines()``). ``raw``: every character. Newlines are read as
    Python reads text (``\\r\\n`` and ``\\r`` are ``\\n``).
    """
    carry = _LINE_START
    try:
        with open(path, encoding="utf-8") as f:
            while chunk := f.read(CHUNK_CHARS):
                if preprocess == "raw":
                    yield _code_points(chunk)
                else:
                    tokens, carry = _d2l(carry + chunk, carry)
                    yield tokens
    except UnicodeDecodeError as exc:
        raise FlagError("--corpus", f"{path} is not UTF-8 text ({exc.reason}).") from None


def _code_points(text: str) -> np.ndarray:
    if text.isascii():
        return np.frombuffer(bytearray(text.encode("ascii")), dtype=np.uint8)
    return np.frombuffer(bytearray(text.encode("utf-32-le")), dtype=np.uint32)


def _d2l(text: str, carry: str) -> tuple[np.ndarray, str]:
    """d2l tokens of ``text``, which begins with ``carry`` (the state the previous chunk left);
    returns them (uint8) and the state this chunk leaves.

    Whole-array steps: every byte other than a letter or a line end becomes a space (a
    character beyond ASCII is no letter, whatever its bytes), runs of spaces shrink to one,
    and a space stays only between two letters; line ends go."""
    mapped = text.encode("utf-8").translate(_D2L_BYTES)
    chars = np.frombuffer(mapped, dtype=np.uint8)
    space = chars == ord(" ")
    repeat = np.zeros_like(space)
    repeat[1:] = space[1:] & space[:-1]
    shrunk = chars[~repeat]
    letter = shrunk > ord(" ")
    keep = letter.copy()
    keep[1:-1] |= (shrunk[1:-1] == ord(" ")) & letter[:-2] & letter[2:]
    tokens = shrunk[keep]
    last = mapped.rstrip(b" ")[-1:]  # ``carry`` leaves a letter or a line end in every chunk
    if last == b"\n":
        state = _LINE_START
    else:
        state = _AFTER_LETTER if len(mapped.rstrip(b" ")) == len(mapped) else _AFTER_GAP
    skip = 1 if carry != _LINE_START else 0  # the letter that stood for the previous chunk
    return tokens[skip:], state


def _d2l_bytes() -> bytes:
    table = bytearray(b" " * 256)
    table[ord("\n")] = ord("\n")
    for letter in range(ord("a"), ord("z") + 1):
        table[letter] = table[letter - 0x20] = letter
    return bytes(table)


_D2L_BYTES = _d2l_bytes()
