"""The prepared corpus: the chapter's tokens, vocabulary and ids, however the file is streamed;
wide vocabularies; interrupted and concurrent preparations; bad input; the remembered sha1."""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.chapter_loop import chapter_tokens
from rnnlm import corpus, prepared
from rnnlm.errors import UserError
from rnnlm.vocab import Vocab
from tests.conftest import ROOT, job_env, read_train_info, run_job

LETTERS = set("abcdefghijklmnopqrstuvwxyz ")
# Every kind of character the two preprocessings treat differently; line ends of all three
# spellings (text mode reads "\r\n" and "\r" as "\n").
ALPHABET = [*"aBcdEfXyZq", " ", " ", "\n", "\r", "\r\n", "\t", *",.!?'-09", "é", "漢"]


def reference(path: Path, preprocess: str) -> list[str]:
    """The tokens as the chapter computes them, over the whole text at once."""
    text = path.read_text(encoding="utf-8")
    if preprocess == "raw":
        return list(text)
    lines = [re.sub("[^A-Za-z]+", " ", line).strip().lower() for line in text.split("\n")]
    return [ch for line in lines for ch in line]


def prepared_dirs(cache: Path) -> list[Path]:
    """The complete prepared directories in a cache (not the ``.part`` ones, not lock files)."""
    root = cache / "prepared"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def part_dirs(cache: Path) -> list[Path]:
    root = cache / "prepared"
    return sorted(root.glob(".*.part")) if root.is_dir() else []


# --- the chapter's tokens, vocabulary and ids -------------------------------------------------


@pytest.mark.parametrize("min_freq", [0, 97, 1500])  # 97: 'j' (97 times) kept, 'q' (95) not
def test_the_chapter_corpus(corpus_path: Path, tmp_path: Path, min_freq: int) -> None:
    tokens = chapter_tokens(corpus_path)
    vocab = Vocab.build(tokens, min_freq)
    ready = prepared.prepare(corpus_path, "chapter", "d2l", min_freq, tmp_path)
    assert ready.vocab == vocab
    assert ready.ids.dtype == torch.uint8
    assert ready.ids.tolist() == vocab.encode(tokens)
    if min_freq == 0:
        assert len(vocab) == 28
    else:
        assert 1 < len(vocab) < 28 and 0 in ready.ids.tolist()  # rare letters are <unk>
    # A later job loads the same directory instead of preparing again.
    again = prepared.prepare(corpus_path, "chapter", "d2l", min_freq, tmp_path)
    assert again.directory == ready.directory and again.vocab == vocab
    assert prepared_dirs(tmp_path) == [ready.directory] and not part_dirs(tmp_path)


def test_the_chapter_d2l_preprocessing(corpus_path: Path, tmp_path: Path) -> None:
    ready = prepared.prepare(corpus_path, "chapter", "d2l", 0, tmp_path)
    assert len(ready.ids) == 170_580
    # Lines joined with no separator: "wells" + "i" of the next line.
    assert ready.vocab.decode(ready.ids[:30].tolist()) == "the time machine by h g wellsi"
    assert set(ready.vocab.idx_to_token[1:]) == LETTERS


@pytest.mark.parametrize(
    ("preprocess", "expected"),
    [("raw", "Hello, World!\nSecond line."), ("d2l", "hello worldsecond line")],
)
def test_raw_keeps_every_character_d2l_letters(
    tmp_path: Path, preprocess: str, expected: str
) -> None:
    path = tmp_path / "hello.txt"
    path.write_text("Hello, World!\nSecond line.")
    ready = prepared.prepare(path, "hello", preprocess, 0, tmp_path)
    assert ready.vocab.decode(ready.ids.tolist()) == expected


def test_a_corpus_without_tokens_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "digits.txt"
    empty.write_text("123 456\n!!!\n")
    with pytest.raises(UserError, match=r"--corpus: .* no tokens after d2l .*--preprocess raw"):
        prepared.prepare(empty, "digits", "d2l", 0, tmp_path)
    assert not prepared_dirs(tmp_path) and not part_dirs(tmp_path)


# --- streaming: any chunk boundary gives the whole text's tokens -------------------------------


@pytest.mark.parametrize("preprocess", ["d2l", "raw"])
def test_streaming_equals_the_whole_text_at_every_chunk_boundary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, preprocess: str
) -> None:
    """Short random texts read 1 to 10 characters at a time: every boundary falls in a run of
    non-letters, between "\\r" and "\\n", beside a non-ASCII letter, at a line end..."""
    checked = 0
    for seed in range(30):
        rng = random.Random(seed)
        path = tmp_path / f"{seed}.txt"
        path.write_bytes("".join(rng.choices(ALPHABET, k=rng.randint(1, 40))).encode())
        tokens = reference(path, preprocess)
        vocab = Vocab.build(tokens)
        for chunk in range(1, 11):
            monkeypatch.setattr(prepared, "CHUNK_CHARS", chunk)
            what = f"text {path.read_bytes()!r}, {chunk} characters a chunk"
            if not tokens:
                with pytest.raises(UserError, match="no tokens"):
                    prepared.prepare(path, f"{seed}-{chunk}", preprocess, 0, tmp_path)
                continue
            ready = prepared.prepare(path, f"{seed}-{chunk}", preprocess, 0, tmp_path)
            assert ready.vocab == vocab, what
            assert ready.ids.tolist() == vocab.encode(tokens), what
            checked += 1
    assert checked > 200  # most texts have tokens: the comparison ran


# --- a vocabulary wider than one byte -----------------------------------------------------------


def wide_text(distinct: int = 300, length: int = 3000) -> str:
    rng = random.Random(0)
    chars = [chr(0x4E00 + i) for i in range(distinct)]  # CJK ideographs
    text = "".join(rng.choice([*chars, " ", "\n"]) for _ in range(length - distinct))
    return "".join(chars) + text  # every one of them at least once


def test_a_vocabulary_wider_than_a_byte_is_int16(tmp_path: Path) -> None:
    path = tmp_path / "wide.txt"
    path.write_text(wide_text(), encoding="utf-8")
    ready = prepared.prepare(path, "wide", "raw", 0, tmp_path)
    assert len(ready.vocab) == 300 + 2 + 1  # the ideographs, space, newline, <unk>
    assert ready.ids.dtype == torch.int16
    assert ready.vocab.decode(ready.ids.tolist()) == wide_text()
    assert ready.vocab == Vocab.build(list(wide_text()))


@pytest.mark.integration
def test_training_on_a_wide_vocabulary(tmp_path: Path) -> None:
    path = tmp_path / "wide.txt"
    path.write_text(wide_text(), encoding="utf-8")
    out = tmp_path / "model"
    proc = run_job([
        "--preprocess", "raw", "--corpus", str(path), "--epochs", "1", "--max-tokens", "500",
        "--val-tokens", "0", "--no-tracking", "--num-hiddens", "16", "--batch-size", "2",
        "--num-steps", "5", "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(out),
        "--sample-prefix", wide_text()[5], "--cpu-kernel", "torch",
    ])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "model.safetensors").is_file()
    assert len(Vocab.load(out / "vocab.json")) == 303
    assert read_train_info(out)["world_size"] == 1


# --- interrupted and concurrent preparations (real processes) ----------------------------------


@pytest.fixture(scope="module")
def big_corpus(
    corpus_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, np.ndarray, Vocab]:
    """About 100 MB of the chapter's words, shuffled (seeded) into lines of 12: one 1 MB block
    of whole lines, repeated. So its tokens are the block's, repeated, and the chapter's code
    on the block is the oracle for the whole file. Returns the file, its expected ids and
    vocabulary."""
    words = corpus_path.read_text().split()
    rng = random.Random(0)
    lines: list[str] = []
    size = 0
    while size < 1 << 20:
        rng.shuffle(words)
        for i in range(0, len(words) - 12, 12):
            lines.append(" ".join(words[i : i + 12]) + "\n")
            size += len(lines[-1])
    folder = tmp_path_factory.mktemp("big")
    block = folder / "block.txt"
    block.write_text("".join(lines))
    tokens = chapter_tokens(block)
    vocab = Vocab.build(tokens)
    path = folder / "big.txt"
    data = block.read_bytes()
    with open(path, "wb") as f:
        for _ in range(100):
            f.write(data)
    return path, np.tile(np.array(vocab.encode(tokens), dtype=np.uint8), 100), vocab


def start_prepare(corpus_file: Path, cache: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "jobs.prepare", "--corpus", str(corpus_file),
             "--cache-dir", str(cache)],
            env=job_env(), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
        )  # fmt: skip


def wait_for(
    condition: Callable[[], bool], procs: list[subprocess.Popen[bytes]], what: str
) -> None:
    deadline = time.monotonic() + 120
    while not condition():
        assert all(p.poll() is None for p in procs), f"a preparation ended before {what}"
        assert time.monotonic() < deadline, f"no {what} within 120 s"
        time.sleep(0.005)


@pytest.mark.integration
def test_an_interrupted_preparation_leaves_nothing_trusted(
    big_corpus: tuple[Path, np.ndarray, Vocab], tmp_path: Path
) -> None:
    path, expected_ids, vocab = big_corpus
    cache = tmp_path / "cache"
    proc = start_prepare(path, cache, tmp_path / "killed.log")
    try:
        wait_for(lambda: bool(part_dirs(cache)), [proc], "a .part directory")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    (stale,) = part_dirs(cache)
    assert not prepared_dirs(cache)  # nothing under the final name ...
    trusted = [p for p in cache.rglob("meta.json") if not p.parent.name.endswith(".part")]
    assert not trusted  # ... and no meta.json anywhere a job would read

    proc2 = run_job(["--corpus", str(path), "--cache-dir", str(cache)], module="jobs.prepare")
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert f"vocabulary {len(vocab)}," in proc2.stdout
    assert not stale.exists() and not part_dirs(cache)  # the next preparation cleaned up
    (directory,) = prepared_dirs(cache)
    ready = prepared.load(directory)
    assert ready.vocab == vocab
    assert np.array_equal(ready.ids.numpy(), expected_ids)


@pytest.mark.integration
def test_two_jobs_preparing_at_once_make_one_copy(
    big_corpus: tuple[Path, np.ndarray, Vocab], tmp_path: Path
) -> None:
    """Two jobs start together. The test holds the corpus' lock until both wait on it, so that
    the race is certain: then one prepares while the other waits, and finds it done. Each
    preparation works in a ``.part`` directory of its own for about a second: the names seen
    while they run count the preparations (a second one would log nothing: its rename loses)."""
    path, expected_ids, vocab = big_corpus
    cache = tmp_path / "cache"
    name = f"{corpus.sha1_of(path)}-d2l-min0-v{prepared.FORMAT}"
    (cache / "prepared").mkdir(parents=True)
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    waiting = "waiting for another job preparing the corpus"
    procs: list[subprocess.Popen[bytes]] = []
    parts: set[str] = set()  # the .part directories seen
    try:
        with open(cache / "prepared" / f"{name}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            procs += [start_prepare(path, cache, log) for log in logs]
            wait_for(lambda: all(waiting in log.read_text() for log in logs), procs, "waiting")
        deadline = time.monotonic() + 300  # the lock is free: the two go on
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            parts.update(p.name for p in part_dirs(cache))
            time.sleep(0.005)
    finally:
        for p in procs:
            p.kill()  # none is left running, whatever failed
            p.wait()
    outputs = [log.read_text() for log in logs]
    assert len(parts) == 1, parts  # one preparation
    assert [p.returncode for p in procs] == [0, 0], outputs
    printed = [[ln for ln in out.splitlines() if ln.startswith("prepared ")] for out in outputs]
    assert printed[0] == printed[1] and len(printed[0]) == 1, printed
    assert f"vocabulary {len(vocab)}," in printed[0][0]
    made = [out for out in outputs if f"rnnlm.prepared: prepared {path.name}:" in out]
    assert len(made) == 1, outputs  # the other one waited, then found it done
    assert [p.name for p in prepared_dirs(cache)] == [name] and not part_dirs(cache)
    assert np.array_equal(prepared.load(cache / "prepared" / name).ids.numpy(), expected_ids)


# --- bad input: one line, exit 2, nothing in the cache ------------------------------------------


def assert_refused(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.integration
@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (b"123 456\n!!!\n", ["--corpus", "no tokens after d2l", "--preprocess raw"]),
        (b"caf\xe9 au lait\n\xff\xfe\n", ["--corpus", "not UTF-8"]),
    ],
    ids=["no-tokens", "not-utf8"],
)
def test_bad_corpus_is_one_line_and_leaves_no_directory(
    tmp_path: Path, content: bytes, needles: list[str]
) -> None:
    path, cache = tmp_path / "corpus.txt", tmp_path / "cache"
    path.write_bytes(content)
    proc = run_job(["--corpus", str(path), "--cache-dir", str(cache)], module="jobs.prepare")
    assert_refused(proc, *needles)
    left = list((cache / "prepared").iterdir())
    assert all(p.is_file() and p.name.endswith(".lock") for p in left), left


def unwritable_cache(tmp_path: Path, how: str) -> Path:
    if how == "under-a-file":  # unwritable even for root
        (tmp_path / "a-file").write_text("")
        return tmp_path / "a-file" / "cache"
    cache = tmp_path / "read-only"
    cache.mkdir()
    cache.chmod(0o500)
    try:
        (cache / "probe").write_text("")
    except OSError:
        return cache
    pytest.skip("this user writes into a 0o500 directory (root): nothing to refuse")


@pytest.mark.integration
@pytest.mark.parametrize("how", ["read-only", "under-a-file"])
def test_unwritable_cache_dir_is_one_line(corpus_path: Path, tmp_path: Path, how: str) -> None:
    cache = unwritable_cache(tmp_path, how)
    try:
        proc = run_job(
            ["--corpus", str(corpus_path), "--cache-dir", str(cache)], module="jobs.prepare"
        )
    finally:
        if how == "read-only":
            cache.chmod(0o700)
    assert_refused(proc, "--cache-dir", "writable")


# --- the remembered sha1 -------------------------------------------------------------------------


def test_sha1_is_remembered_until_the_file_changes(tmp_path: Path) -> None:
    path, cache = tmp_path / "text.txt", tmp_path / "cache"
    path.write_text("first version\n")
    first = corpus.sha1_remembered(path, cache)
    assert first == corpus.sha1_of(path)
    (memo,) = (cache / "sha1").iterdir()
    # A planted value under the same identity is what the next call returns: it did not hash.
    known = json.loads(memo.read_text())
    memo.write_text(json.dumps({**known, "sha1": "0" * 40}))
    assert corpus.sha1_remembered(path, cache) == "0" * 40
    # New content of the same size, a new modification time: hashed anew.
    stat = path.stat()
    path.write_text("other version\n")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert corpus.sha1_remembered(path, cache) == corpus.sha1_of(path) != first
    # Another size: hashed anew as well, and remembered for the next call.
    path.write_text("a longer third version\n")
    third = corpus.sha1_remembered(path, cache)
    assert third == corpus.sha1_of(path)
    assert json.loads(memo.read_text())["sha1"] == third


def _resident_kb_of(path: Path) -> int:
    """This process's resident kB of its mappings of ``path`` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_pages_read_are_unmapped_so_resident_memory_stays_flat(tmp_path: Path) -> None:
    """A rank reads its minibatches from the map; without unmapping, every page it ever read
    would stay in its resident memory (a whole corpus per rank after a pass)."""
    text = tmp_path / "c.txt"
    words = Path(ROOT.parent / "shared" / "data" / "timemachine.txt").read_text().split()
    text.write_text(" ".join(random.Random(0).choices(words, k=2_000_000)))  # ~12 MB of ids
    ready = prepared.prepare(text, "s", "d2l", 0, tmp_path / "cache")
    ids_file = ready.directory / "ids.bin"
    assert int(ready.ids[::4096].sum()) > 0  # touch every page
    touched = _resident_kb_of(ids_file)
    assert touched > 0.9 * ids_file.stat().st_size / 1024
    before = ready.ids[:1000].clone()
    ready.unmap_pages()
    assert _resident_kb_of(ids_file) < 0.05 * touched
    assert torch.equal(ready.ids[:1000], before)  # read again from the file: the same ids
