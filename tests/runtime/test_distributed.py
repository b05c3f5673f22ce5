"""Data-parallel training under torchrun: sharding, gathering, and real 2-process runs on the
CPU (gloo) with a tiny model, including a kill and a resume."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from bus_core.constants import CLASSES
from bus_core.data.dataset import load_records
from bus_core.data.loader import epoch_plan
from bus_core.data.splits import load_split, split_records
from bus_core.models.build import load_model
from bus_core.runtime.distributed import Ranks, interleave, local_gpus, shard
from bus_core.training.runs import read_progress

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TINY = ["--resize", "40", "--crop", "32", "--batch-size", "2", "--device", "cpu-fp32",
        "--save-dtype", "float32"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def test_shards_are_disjoint_cover_the_plan_and_keep_it_balanced():
    labels = [0] * 9 + [1] * 4 + [2] * 2
    plan = epoch_plan(labels, "augment", epoch=3, seed=0)
    shards = [shard(plan, Ranks(rank, 2)) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == -(-len(plan) // 2)
    positions = [set(range(rank, len(plan), 2)) for rank in range(2)]
    assert not positions[0] & positions[1]
    assert shards[0] == [plan[i] for i in sorted(positions[0])]
    padded = shards[0] + shards[1]
    assert Counter(padded) - Counter(plan) == Counter(plan[:len(padded) - len(plan)])
    per_class = Counter(labels[item.index] for item in plan)
    assert len(set(per_class.values())) == 1  # balanced over the epoch the ranks share
    assert shard(plan, Ranks()) == plan


def test_interleave_undoes_the_split_of_evaluation_sets():
    rows = np.arange(14, dtype=np.float32).reshape(7, 2)
    assert np.array_equal(interleave([rows[r::3] for r in range(3)]), rows)
    empty = np.zeros((0, 0), np.float32)  # a rank without items
    assert np.array_equal(interleave([rows[:1], empty]), rows[:1])


def _wait_for(progress: Path, proc: subprocess.Popen, event: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if any(e["event"] == event for e in read_progress(progress)):
            return
        time.sleep(0.05)
    raise AssertionError(f"no {event!r} event (process ended: {proc.poll()})")


def _process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def _kill_tree(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux's /proc")
def test_torchrun_trains_one_model_and_resumes_after_a_kill(busi_dir, tmp_path):
    """`--nproc-per-node 2` starts torchrun itself; each rank trains on half of every epoch;
    killed (every process) after its first epoch, the run goes on from its checkpoint under
    torchrun started by hand, and rank 0 saves one model."""
    out = tmp_path / "m"
    progress = out / "train" / "progress.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "bus_core", "train", "--data", str(busi_dir),
                             "--out", str(out), "--epochs", "2", "--nproc-per-node", "2",
                             "--checkpoint-every", "0", *TINY],
                            cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for(progress, proc, "epoch")
    finally:
        _kill_tree(_process_tree(proc.pid))
        proc.wait()
    first = read_progress(progress)
    assert [e["event"] for e in first if e["event"] != "step"][:2] == ["start", "epoch"]
    assert first[0]["world_size"] == 2 and not (out / "card.json").exists()
    train = split_records(load_records(busi_dir), load_split(out / "train" / "split.json"),
                          "train")
    plan = epoch_plan([CLASSES.index(r.label) for r in train], "augment", 0, 0)
    steps = [e["step"] for e in first if e["event"] == "step" and e["epoch"] == 1]
    assert steps == list(range(1, -(-len(plan) // 2 // 2) + 1))  # half the plan, 2 per batch

    done = subprocess.run([*TORCHRUN, "-m", "bus_core", "train", "--resume", "--out", str(out)],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    events = read_progress(progress)
    resumed = [e for e in events if e["event"] == "start" and e["resumed"]]
    assert [(e["epoch"], e["world_size"]) for e in resumed] == [(1, 2)]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2]
    assert [e["event"] for e in events].count("done") == 1
    card = load_model(out).card
    assert [h["epoch"] for h in card.metrics["history"]] == [1, 2]
    assert card.hyperparameters["world_size"] == 2
    assert card.hyperparameters["global_batch_size"] == 4


def test_local_gpus_counts_cuda_devices_only(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert local_gpus("auto") == local_gpus("cuda") == 4
    assert local_gpus("cpu") == local_gpus("mps") == 0


def test_train_page_offers_all_gpus_when_there_are_several(monkeypatch, tmp_path, busi_dir):
    import bus_core.runtime.distributed
    import bus_core.training.jobs
    from tests.conftest import signed_in_app
    from tests.test_pages_train import configure

    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path))
    started = []
    monkeypatch.setattr(bus_core.training.jobs, "start_training",
                        lambda config, **kw: started.append(config))
    monkeypatch.setattr(bus_core.runtime.distributed, "local_gpus", lambda choice: 1)
    at = signed_in_app()
    at.run()
    at.switch_page("pages/train.py").run()
    assert not [c for c in at.checkbox if c.key == "train_all_gpus"]
    monkeypatch.setattr(bus_core.runtime.distributed, "local_gpus", lambda choice: 2)
    configure(at, busi_dir, "two-gpus")
    at.checkbox(key="train_all_gpus").check().run()
    assert at.checkbox(key="train_all_gpus").label == "All 2 GPUs of this machine"
    at.button(key="train_start").click().run()
    assert [c.nproc_per_node for c in started] == [2]
