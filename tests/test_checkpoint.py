"""Checkpoint writes that survive a full disk, and the clean-up of a killed writer's temp files."""
from __future__ import annotations

import errno
import re

import pytest
import torch

from xlearner import engine

from xlearner.run import checkpoint
from xlearner.run.checkpoint import CheckpointError, load_checkpoint, save_run_checkpoint
from test_engine import make_run


def fill_disk_after(nbytes: int):
    """A torch.save that writes `nbytes` of the file, then fails the way a full disk does."""
    def save(obj, path):
        with open(path, "wb") as f:
            f.write(b"\x00" * nbytes)
        raise OSError(errno.ENOSPC, "No space left on device")
    return save


def test_disk_full_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    save_run_checkpoint({"model": {"w": torch.ones(1000)}, "step": 1, "config": {}}, out)
    save_run_checkpoint({"model": {"w": torch.full((1000,), 2.0)}, "step": 2, "config": {}}, out)
    good, prev = (out / "checkpoint.pt").read_bytes(), (out / "checkpoint_prev.pt").read_bytes()

    monkeypatch.setattr(checkpoint.torch, "save", fill_disk_after(1000))
    with pytest.raises(CheckpointError) as err:
        save_run_checkpoint({"model": {"w": torch.zeros(1000)}, "step": 3, "config": {}}, out)
    msg = str(err.value)
    assert msg.startswith(f"{out / 'checkpoint.pt'}: could not write the checkpoint (No space left on device): ")
    assert re.search(r"\d+ MB free on that disk, a checkpoint needs about 0 MB; the last good checkpoint "
                     rf"{re.escape(str(out / 'checkpoint.pt'))} is untouched", msg), msg
    assert (out / "checkpoint.pt").read_bytes() == good  # neither rotated away nor overwritten
    assert (out / "checkpoint_prev.pt").read_bytes() == prev
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "checkpoint_prev.pt", "config.json"]


def test_disk_full_during_training_stops_cleanly_and_resumes(tmp_path, monkeypatch):
    """ckpt_every=2: the write at step 4 fails; the run stops with the error, a re-run resumes from step 2."""
    run = make_run(tmp_path, steps=6, ckpt_every=2)
    real_save, calls = torch.save, []

    def full_on_second(obj, path):
        calls.append(path)
        return (fill_disk_after(500) if len(calls) == 2 else real_save)(obj, path)

    monkeypatch.setattr(checkpoint.torch, "save", full_on_second)
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: could not write the checkpoint \(No space left"):
        engine.train(run)
    out = tmp_path / "run"
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert not list(out.glob(".checkpoint.pt.tmp*"))
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    resumed = make_run(tmp_path, steps=6, ckpt_every=2)
    engine.train(resumed)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 6
    full = make_run(tmp_path / "full", steps=6, ckpt_every=2)
    engine.train(full)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_stale_temp_files_are_removed_at_start(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint.pt.tmp123").write_bytes(b"\x00" * 100)  # a writer killed mid-write
    (out / "notes.txt").write_text("keep me")
    engine.train(make_run(tmp_path, steps=1))
    assert not (out / ".checkpoint.pt.tmp123").exists()
    assert (out / "notes.txt").read_text() == "keep me"
    assert f"removed {out / '.checkpoint.pt.tmp123'}, left by a checkpoint write that was killed" in capsys.readouterr().out
