"""Preparing a model before the first reading (`bus_core.inference.warm`), the `warm` command and
the OpenVINO cache's pruning (`backends.prune_cache`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest

from bus_core.cli.main import main
from bus_core.inference import outline as segment
from bus_core.inference import predict, warm
from bus_core.runtime import backends
from bus_core.runtime.backends import TorchForward
from tests.conftest import REPO, copy_model

WAIT_S = 120
"""Only a guard against a test hanging: no assertion depends on it."""


class GatedBackend:
    """A stand-in for `backends.choose_forward` that counts the networks prepared (by input
    side) and lets each one finish only when the test releases it."""

    def __init__(self) -> None:
        self.built: Counter[tuple[int, int]] = Counter()
        self.gate = threading.Semaphore(0)

    def __call__(self, model, device, weights_sha256, input_hw, backend=None):
        self.built[input_hw] += 1
        assert self.gate.acquire(timeout=WAIT_S)
        return TorchForward(model, device)


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> GatedBackend:
    fake = GatedBackend()
    monkeypatch.setattr(predict, "choose_forward", fake)
    monkeypatch.setattr(segment, "choose_forward", fake)
    monkeypatch.setattr(warm, "_warmups", OrderedDict())
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "data"))
    return fake


@pytest.fixture
def two_stage(tiny_model_dir: Path, tiny_segmenter_dir: Path, tmp_path: Path) -> Path:
    """A two-stage model folder beside its whole-image model and outline model."""
    copy_model(tiny_model_dir, tmp_path / "whole", name="tiny-whole")
    copy_model(tiny_segmenter_dir, tmp_path / "outline")
    return copy_model(tiny_model_dir, tmp_path / "lesion", name="tiny-lesion",
                      input_mode="lesion-context", crop_margin=0.5,
                      two_stage={"whole_image_model": "whole", "outline_model": "outline"})


def test_two_readings_at_once_share_one_preparation(gated, tiny_model_dir, tiny_segmenter_dir):
    results: list[warm.Prepared] = []

    def reading() -> None:
        results.append(warm.warm(tiny_model_dir, tiny_segmenter_dir, device="cpu-fp32")
                       .result())

    readers = [threading.Thread(target=reading) for _ in range(2)]
    for reader in readers:
        reader.start()
    asked_again = warm.warm(tiny_model_dir, tiny_segmenter_dir, device="cpu-fp32")
    assert not asked_again.done()
    assert asked_again.progress().sentence() == \
        "Preparing the model for this computer: 0 of 2 networks"
    gated.gate.release(2)
    for reader in readers:
        reader.join(WAIT_S)
    assert len(results) == 2 and results[0] is results[1] is asked_again.result()
    assert gated.built == {(32, 32): 1, (64, 64): 1}  # each network once
    assert results[0].segmenter is not None and results[0].segmenter.card.name == "tiny-seg"
    image = np.random.default_rng(0).integers(0, 255, (48, 56, 3), dtype=np.uint8)
    assert results[0].predictor.predict(image).label in results[0].predictor.classes
    warm.warm(tiny_model_dir, tiny_segmenter_dir, device="cpu-fp32")
    assert sum(gated.built.values()) == 2  # prepared models are kept


def test_progress_counts_the_networks_and_shares_the_outline_model(gated, two_stage):
    warmup = warm.warm(two_stage, two_stage.parent / "outline", device="cpu-fp32")
    seen = warmup.progress()
    assert (seen.done, seen.total, seen.state) == (0, 3, "preparing")
    sentences = []
    for _ in range(3):
        gated.gate.release()
        seen = warmup.wait(seen, timeout=WAIT_S)
        sentences.append(seen.sentence())
    assert sentences[:2] == ["Preparing the model for this computer: 1 of 3 networks",
                             "Preparing the model for this computer: 2 of 3 networks"]
    prepared = warmup.result()
    assert warmup.progress().state == "ready" and warmup.progress().fraction == 1.0
    assert prepared.segmenter is prepared.predictor.outliner  # not prepared twice
    assert sum(gated.built.values()) == 3


def test_a_failed_preparation_raises_in_every_reader(gated, tiny_model_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no memory left")

    monkeypatch.setattr(predict, "choose_forward", broken)
    warmup = warm.warm(tiny_model_dir, device="cpu-fp32")
    with pytest.raises(RuntimeError, match="no memory left"):
        warmup.result()
    assert warmup.progress().state == "failed"
    assert "could not be prepared: no memory left" in warmup.progress().sentence()
    monkeypatch.setattr(predict, "choose_forward", gated)
    gated.gate.release()
    again = warm.warm(tiny_model_dir, device="cpu-fp32")  # tried again, not the failure kept
    assert again is not warmup and again.result().predictor.card.name == "tiny-test"


def test_warm_command_prepares_and_reports(gated, tiny_model_dir, tiny_segmenter_dir,
                                           monkeypatch, capsys):
    monkeypatch.setenv("BUS_SEGMENTER", str(tiny_segmenter_dir))
    gated.gate.release(2)
    assert main(["warm", "--model", str(tiny_model_dir), "--device", "cpu-fp32",
                 "--backend", "torch"]) == 0
    out = capsys.readouterr().out
    assert "Preparing tiny-test for this computer (2 networks)." in out
    assert "Ready in " in out and "PyTorch, CPU, fp32" in out
    assert "OpenVINO cache: 0.0 MB." in out
    assert main(["warm", "--model", str(tiny_model_dir.parent / "missing")]) == 2


def test_pruning_keeps_only_the_installed_models_of_this_openvino(tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "openvino_version", lambda: "2026.4.1")
    keep, gone = "a" * 64, "b" * 64
    names = {"kept": f"{keep[:16]}-224x224-act-ov2026.4.1",
             "other weights": f"{gone[:16]}-224x224-act-ov2026.4.1",
             "older openvino": f"{keep[:16]}-224x224-act-ov2025.1.0",
             "old layout": "compiled", "interrupted": ".convert-x1y2"}
    for name in names.values():
        (tmp_path / name / "compiled").mkdir(parents=True)
        (tmp_path / name / "model.bin").write_bytes(b"0" * 1000)
    precisions = {f"{n} | cpu": "f32" for n in names.values()}
    (tmp_path / backends.PRECISION_FILE).write_text(json.dumps(precisions))
    report = backends.prune_cache({keep}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [names["kept"]]
    assert sorted(report.removed) == sorted(v for k, v in names.items() if k != "kept")
    assert report.freed_bytes == 4000
    assert report.size_bytes == 1000 + (tmp_path / backends.PRECISION_FILE).stat().st_size
    remembered = json.loads((tmp_path / backends.PRECISION_FILE).read_text())
    assert remembered == {f"{names['kept']} | cpu": "f32"}
    assert backends.prune_cache({keep}, tmp_path / "none").removed == []


def test_installed_weights_name_the_active_model(tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("BUS_MODEL", str(tiny_model_dir))
    card = json.loads((tiny_model_dir / "card.json").read_text())
    assert card["weights_sha256"] in warm.installed_weights()


def test_an_unusable_outline_model_leaves_the_classifier_ready(gated, tiny_model_dir, tmp_path):
    gated.gate.release(2)
    missing = warm.warm(tiny_model_dir, tmp_path / "no-segmenter", device="cpu-fp32")
    assert missing.progress().total == 1 and missing.result().segmenter is None
    broken = copy_model(tiny_model_dir, tmp_path / "broken-seg")  # a classifier, not a segmenter
    prepared = warm.warm(tiny_model_dir, broken, device="cpu-fp32").result()
    assert prepared.segmenter is None and prepared.predictor.card.name == "tiny-test"


def test_a_ready_model_keeps_its_cache_entry_and_drops_stale_ones(gated, tiny_model_dir,
                                                                   tmp_path):
    sha = json.loads((tiny_model_dir / "card.json").read_text())["weights_sha256"]
    version = backends.openvino_version() or "none"
    cache = backends.cache_dir()
    ours, stale = cache / f"{sha[:16]}-32x32-act-ov{version}", cache / f"{'0' * 16}-32x32"
    for entry in (ours, stale):
        (entry / "compiled").mkdir(parents=True)
    gated.gate.release()
    warmup = warm.warm(tiny_model_dir, device="cpu-fp32")  # not an installed model
    warmup.result()
    report = warmup.cache_report()
    assert ours.is_dir() and not stale.exists()
    assert report is not None and report.removed == [stale.name]


def test_a_program_that_ends_while_its_model_is_prepared_exits_cleanly(tiny_model_dir, tmp_path):
    """Started from a daemon thread (as the app's scripts run) and left running when the program
    ends: the preparation stops at its next network and the exit status is 0, not an abort."""
    script = (
        "import sys, threading\n"
        "from bus_core.inference import warm\n"
        "entered, real = threading.Event(), warm.Predictor\n"
        "def predictor(*args, **kwargs):\n"
        "    entered.set()\n"
        "    return real(*args, **kwargs)\n"
        "warm.Predictor = predictor\n"
        "threading.Thread(target=lambda: warm.warm(sys.argv[1], backend='torch'),"
        " daemon=True).start()\n"
        "entered.wait()\n")  # the program ends while the network is being built
    done = subprocess.run([sys.executable, "-c", script, str(tiny_model_dir)], cwd=REPO,
                          env={**os.environ, "BUS_DATA_DIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
