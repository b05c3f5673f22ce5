"""Inference backends: choice and fallback, the OpenVINO cache, agreement with PyTorch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from bus_core.models.build import load_model
from bus_core.runtime import backends
from bus_core.runtime.backends import OpenVinoForward, TorchForward, choose_forward
from bus_core.runtime.device import choose_device

CPU = choose_device("cpu-fp32")


@pytest.fixture
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    return tmp_path / "data"


def test_torch_when_asked_when_openvino_is_missing_or_unknown(tiny, monkeypatch):
    assert isinstance(choose_forward(tiny.model, CPU, "ab" * 32, (32, 32), "torch"),
                      TorchForward)
    assert isinstance(choose_forward(tiny.model, CPU, "ab" * 32, (32, 32), "banana"),
                      TorchForward)
    monkeypatch.setattr(backends, "openvino_available", lambda: False)
    assert isinstance(choose_forward(tiny.model, CPU, "ab" * 32, (32, 32), "auto"),
                      TorchForward)


def test_a_failing_conversion_falls_back_to_torch(tiny, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(backends, "openvino_available", lambda: True)
    monkeypatch.setattr(backends, "OpenVinoForward", broken)
    forward = choose_forward(tiny.model, CPU, "ab" * 32, (32, 32), "openvino")
    assert isinstance(forward, TorchForward) and forward.description.startswith("PyTorch")


openvino = pytest.importorskip("openvino")


def test_openvino_agrees_with_torch_and_is_cached_per_weights(tiny, data_dir, monkeypatch):
    monkeypatch.setattr(backends, "cpu_supports_bf16", lambda: False)  # exact fp32 comparison
    forward = choose_forward(tiny.model, CPU, "ab" * 32, (32, 32), "auto")
    assert isinstance(forward, OpenVinoForward) and "f32" in forward.description
    batch = torch.randn(5, 3, 32, 32)
    reference = TorchForward(tiny.model, CPU)(batch)
    ours = forward(batch)
    assert ours.shape == reference.shape == (5, 3)
    assert np.abs(ours - reference).max() < 1e-3
    entries = sorted((data_dir / "cache" / "openvino").glob("abababab*"))
    assert len(entries) == 1 and (entries[0] / "model.bin").is_file()
    assert (entries[0] / backends.COMPILED).is_dir()  # its blobs go when the entry goes
    stamp = (entries[0] / "model.bin").stat().st_mtime_ns
    choose_forward(tiny.model, CPU, "ab" * 32, (32, 32), "openvino")  # reused, not converted
    assert (entries[0] / "model.bin").stat().st_mtime_ns == stamp
    choose_forward(tiny.model, CPU, "cd" * 32, (32, 32), "openvino")  # new weights: new entry
    assert len(list((data_dir / "cache" / "openvino").glob("*-32x32-act-ov*"))) == 2


@pytest.mark.slow
def test_predictor_uses_the_backend_and_keeps_torch_for_grad_cam(tiny_model_dir):
    from bus_core.inference.predict import Predictor
    from tests.conftest import synthetic_image

    image, _ = synthetic_image("benign", np.random.default_rng(0), size=(120, 150))
    fast = Predictor(load_model(tiny_model_dir), "cpu-fp32", backend="openvino")
    slow = Predictor(load_model(tiny_model_dir), "cpu-fp32", backend="torch")
    assert fast.description.startswith("OpenVINO") and slow.description.startswith("PyTorch")
    a, b = fast.predict(image), slow.predict(image)
    assert a.label == b.label
    assert max(abs(a.probabilities[c] - b.probabilities[c]) for c in a.probabilities) < 0.02
    assert fast.explain(a).shape == a.model_view.shape[:2]


@pytest.mark.slow
def test_the_outline_model_runs_through_openvino_too(tiny_segmenter_dir):
    from bus_core.inference.outline import Segmenter
    from tests.conftest import synthetic_image

    image, _ = synthetic_image("benign", np.random.default_rng(0), size=(120, 150))
    fast = Segmenter(load_model(tiny_segmenter_dir), "cpu-fp32", backend="openvino")
    slow = Segmenter(load_model(tiny_segmenter_dir), "cpu-fp32", backend="torch")
    assert fast.forward.description.startswith("OpenVINO")
    assert slow.forward.description.startswith("PyTorch")
    a, b = fast.probabilities([image])[0], slow.probabilities([image])[0]
    assert a.shape == b.shape == image.shape[:2] and np.abs(a - b).max() < 1e-3


@pytest.mark.slow
def test_evaluate_through_openvino_matches_torch(tiny_model_dir, busi_dir):
    from bus_core.data.dataset import load_records
    from bus_core.evaluation.evaluate import evaluate

    records = load_records(busi_dir)
    a = evaluate(load_model(tiny_model_dir), records, device="cpu-fp32", backend="openvino")
    b = evaluate(load_model(tiny_model_dir), records, device="cpu-fp32", backend="torch")
    assert (a.probs.argmax(1) == b.probs.argmax(1)).all()
    assert np.abs(a.probs - b.probs).max() < 0.02


@pytest.mark.slow
def test_openvino_returns_the_cam_activations_in_the_same_pass(tiny_model_dir, monkeypatch):
    from bus_core.inference import cam
    from bus_core.inference.predict import Predictor
    from bus_core.models.build import gradcam_layer
    from tests.conftest import synthetic_image

    monkeypatch.setattr(backends, "cpu_supports_bf16", lambda: False)
    image, _ = synthetic_image("malignant", np.random.default_rng(2), size=(120, 150))
    fast = Predictor(load_model(tiny_model_dir), "cpu-fp32", backend="openvino")
    prediction = fast.predict(image)
    assert prediction.activations is not None and prediction.activations.ndim == 3
    for target in fast.classes:
        reference = cam.compute_cam(fast.model, gradcam_layer(fast.model, "densenet121"),
                                    prediction.tensor, fast.classes.index(target))
        assert np.abs(fast.explain(prediction, target) - reference).max() < 1e-3
    assert Predictor(load_model(tiny_model_dir), "cpu-fp32", backend="torch").predict(
        image).activations is None


def test_the_faster_precision_is_measured_once_and_remembered(tmp_path, monkeypatch):
    compiled: list[str] = []
    speed = {"bf16": 5.0, "f32": 4.0}  # close: each network is timed

    def compile_for(precision: str):
        compiled.append(precision)
        return precision

    monkeypatch.setattr(backends, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(backends, "interleaved_p50",
                        lambda models, image, n, warmup: {p: speed[p] for p in models})
    assert backends.choose_precision(compile_for, "entry-a", (32, 32), tmp_path) == ("f32", "f32")
    assert sorted(compiled) == ["bf16", "f32"]
    saved = (tmp_path / backends.PRECISION_FILE).read_text()
    assert "entry-a" in saved and '"f32"' in saved
    compiled.clear()
    speed.update(bf16=1.0)  # remembered: not timed again
    assert backends.choose_precision(compile_for, "entry-a", (32, 32), tmp_path)[0] == "f32"
    assert compiled == ["f32"]
    assert backends.choose_precision(compile_for, "entry-b", (32, 32), tmp_path)[0] == "bf16"
    monkeypatch.setattr(backends, "cpu_supports_bf16", lambda: False)  # never bf16 without it
    compiled.clear()
    assert backends.choose_precision(compile_for, "entry-b", (32, 32), tmp_path)[0] == "f32"
    assert compiled == ["f32"]


def test_a_clearly_faster_precision_is_taken_for_the_other_networks(tmp_path, monkeypatch):
    compiled: list[str] = []

    def compile_for(precision: str):
        compiled.append(precision)
        return precision

    monkeypatch.setattr(backends, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(backends, "interleaved_p50",
                        lambda models, image, n, warmup: {"bf16": 10.0, "f32": 17.0})
    assert backends.choose_precision(compile_for, "a-ov1.0", (32, 32), tmp_path)[0] == "bf16"
    compiled.clear()
    monkeypatch.setattr(backends, "interleaved_p50", lambda *args, **kwargs: pytest.fail(
        "timed again"))
    assert backends.choose_precision(compile_for, "b-ov1.0", (32, 32), tmp_path)[0] == "bf16"
    assert compiled == ["bf16"]  # one compile, no timing
    # another OpenVINO version is timed again
    monkeypatch.setattr(backends, "interleaved_p50",
                        lambda models, image, n, warmup: {"bf16": 10.0, "f32": 9.0})
    assert backends.choose_precision(compile_for, "b-ov2.0", (32, 32), tmp_path)[0] == "f32"


def test_a_broken_or_unwritable_precision_file_only_costs_a_timing(tmp_path, monkeypatch):
    monkeypatch.setattr(backends, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(backends, "interleaved_p50",
                        lambda models, image, n, warmup: {"bf16": 1.0, "f32": 2.0})
    (tmp_path / backends.PRECISION_FILE).write_text("{not json")
    assert backends.choose_precision(lambda p: p, "e", (32, 32), tmp_path)[0] == "bf16"
    missing = tmp_path / "no" / "such" / "folder"
    assert backends.choose_precision(lambda p: p, "e", (32, 32), missing)[0] == "bf16"


@pytest.mark.slow
def test_openvino_times_both_precisions_on_a_bf16_cpu(tiny, data_dir, monkeypatch):
    monkeypatch.setattr(backends, "cpu_supports_bf16", lambda: True)
    forward = choose_forward(tiny.model, CPU, "ef" * 32, (32, 32), "openvino")
    assert isinstance(forward, OpenVinoForward) and forward.precision in ("bf16", "f32")
    saved = (data_dir / "cache" / "openvino" / backends.PRECISION_FILE).read_text()
    assert forward.precision in saved and backends.cpu_name() in saved


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sigaltstack via Linux libc")
def test_loading_openvino_keeps_the_threads_signal_stack(tmp_path):
    # OpenVINO's CPU plugin puts its own alternate signal stack on the thread that loads it and
    # frees it when it unloads; a Python signal handler run later on that stack was the
    # SIGSEGV of the test suite. A fresh process, so that the plugin loads here.
    script = textwrap.dedent("""
        import ctypes, faulthandler
        import numpy as np, openvino as ov, torch
        from bus_core.runtime.backends import _SignalStack, compile_on_cpu
        libc = ctypes.CDLL(None)
        def stack():
            s = _SignalStack()
            libc.sigaltstack(None, ctypes.byref(s))
            return s.ss_sp, s.ss_size
        faulthandler.enable()
        before = stack()
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
        compiled = compile_on_cpu(ov.convert_model(net, example_input=torch.zeros(1, 3, 16, 16)),
                                  "f32")
        compiled(np.zeros((1, 3, 16, 16), np.float32))
        print(before == stack(), before != (None, 0))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]
