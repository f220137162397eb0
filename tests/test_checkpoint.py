"""Checkpoint files: atomic writes, retention, fallback past broken files, no code execution."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from rnnlm import checkpoint
from rnnlm.errors import FlagError


def payload(step: int) -> dict:
    return {
        "format": checkpoint.FORMAT,
        "global_step": step,
        "model": {"w": torch.full((3,), float(step))},
        "data_rng": (3, tuple(range(625)), None),
        "config": {"seed": 0, "batch_size": 32},
        "model_config": {"cell": "rnn", "num_hiddens": 8},
        "vocab": ["<unk>", " ", "e"],
    }


def test_save_keeps_the_newest(tmp_path: Path) -> None:
    for step in (5, 10, 15, 20):
        checkpoint.save(tmp_path, payload(step), step, keep=2)
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == ["ckpt-0000000020.pt", "ckpt-0000000015.pt"]
    assert sorted(os.listdir(tmp_path)) == sorted(names)  # no temporary files left
    _path, loaded = checkpoint.load_newest(tmp_path)
    assert loaded["global_step"] == 20 and torch.equal(loaded["model"]["w"], torch.full((3,), 20.0))
    assert loaded["data_rng"] == (3, tuple(range(625)), None)


def test_truncated_newest_falls_back_to_the_previous(tmp_path: Path, caplog) -> None:
    for step in (1, 2):
        checkpoint.save(tmp_path, payload(step), step, keep=3)
    newest = checkpoint.path_for(tmp_path, 2)
    newest.write_bytes(newest.read_bytes()[:100])
    _path, loaded = checkpoint.load_newest(tmp_path)
    assert loaded["global_step"] == 1
    assert "skipping unusable checkpoint" in caplog.text and newest.name in caplog.text


class Payload:
    """Unpickling this runs code: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_planted_pickle_payload_is_refused(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, payload(1), 1, keep=3)
    marker = tmp_path.parent / "code-was-executed"
    torch.save({"format": 1, "evil": Payload(marker)}, checkpoint.path_for(tmp_path, 99))
    _path, loaded = checkpoint.load_newest(tmp_path)
    assert loaded["global_step"] == 1  # the planted file is skipped...
    assert not marker.exists()  # ...and nothing in it ran


def test_incompatible_checkpoint_is_refused(tmp_path: Path) -> None:
    ckpt = payload(1)
    checkpoint.check_compatible(ckpt, {"cell": "rnn", "num_hiddens": 8}, ckpt["vocab"], tmp_path)
    with pytest.raises(FlagError, match=r"num_hiddens 8 vs 16.*--fresh"):
        checkpoint.check_compatible(
            ckpt, {"cell": "rnn", "num_hiddens": 16}, ckpt["vocab"], tmp_path
        )
    with pytest.raises(FlagError, match=r"different vocabulary.*--fresh"):
        checkpoint.check_compatible(ckpt, ckpt["model_config"], ["<unk>", "a"], tmp_path)


def test_unwritable_directory_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(FlagError, match="--checkpoint-dir: cannot write"):
        checkpoint.check_writable(blocker / "ckpts")


def test_a_checkpoint_of_an_earlier_format_stops_the_job(tmp_path: Path) -> None:
    """Resuming past it would silently start over, and the newest files kept by step number
    would then be the earlier job's: one line names the way out instead."""
    earlier = {**payload(900), "format": checkpoint.FORMAT - 1}
    torch.save(earlier, checkpoint.path_for(tmp_path, 900))
    checkpoint.save(tmp_path, payload(10), 10, keep=3)
    with pytest.raises(
        FlagError,
        match=r"--checkpoint-dir: .*ckpt-0000000900.pt was written "
        r"by an earlier rnnlm \(format 1, this version reads 2\); pass --fresh",
    ):
        checkpoint.load_newest(tmp_path)


def test_retention_keeps_what_was_just_written_beside_a_higher_numbered_foreign_file(
    tmp_path: Path,
) -> None:
    """A corrupt or foreign file numbered above this job's steps used to count as the newest:
    keep=2 then deleted the checkpoint just written. It neither counts nor is deleted."""
    foreign = checkpoint.path_for(tmp_path, 9_999_999_999)
    foreign.write_bytes(b"not a checkpoint")
    for step in (5, 10, 15):
        written = checkpoint.save(tmp_path, payload(step), step, keep=2)
        assert written.exists()
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == [foreign.name, "ckpt-0000000015.pt", "ckpt-0000000010.pt"]
    path, loaded = checkpoint.load_newest(tmp_path)  # the foreign file is skipped, as before
    assert path.name == "ckpt-0000000015.pt" and loaded["global_step"] == 15


def test_temporary_files_of_a_killed_writer_are_removed(tmp_path: Path) -> None:
    leftover = tmp_path / f"{checkpoint.TMP_PREFIX}k1ll3d.tmp"
    leftover.write_bytes(b"half a checkpoint")
    checkpoint.save(tmp_path, payload(1), 1, keep=2)
    checkpoint.remove_temporary(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-0000000001.pt"]
