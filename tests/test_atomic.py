"""Atomic writes: the old file stays until the new one is whole; failures leave nothing."""

from __future__ import annotations

import pytest

from bus_core import atomic


def test_write_replaces_whole_files(tmp_path):
    path = tmp_path / "a.json"
    atomic.write_text(path, "first")
    atomic.write_bytes(path, b"second")
    assert path.read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_path(path) as temp:
        temp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_partial_writes_of_a_killed_process_are_removed(tmp_path):
    (tmp_path / ".checkpoint.pt.abc123.tmp").write_bytes(b"x" * 100)
    (tmp_path / "checkpoint.pt").write_bytes(b"whole")
    removed = atomic.remove_partial_writes(tmp_path)
    assert [p.name for p in removed] == [".checkpoint.pt.abc123.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.slow
def test_a_new_run_clears_what_a_killed_checkpoint_write_left(busi_dir, tmp_path):
    from bus_core.training.train import TrainConfig, train

    run = tmp_path / "m" / "train"
    run.mkdir(parents=True)
    (run / ".checkpoint.pt.k1ll3d.tmp").write_bytes(b"partial")
    config = TrainConfig(data=[str(busi_dir)], out=str(tmp_path / "m"), resize=40, crop=32,
                         epochs=1, batch_size=4, device="cpu-fp32")
    assert train(config).status == "done"
    assert not list(run.glob(".*.tmp"))


def test_new_files_are_readable_by_others_and_keep_their_mode(tmp_path):
    import stat

    path = atomic.write_text(tmp_path / "card.json", "{}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    path.chmod(0o600)
    atomic.write_text(path, "{}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
