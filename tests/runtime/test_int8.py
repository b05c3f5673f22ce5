"""int8 measurement (`python -m bus_core.bench --int8`): the message without NNCF, the rule, and
a tiny quantisation round trip when NNCF is installed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bus_core.bench import main as bench
from bus_core.cli.main import main as cli
from bus_core.errors import DataError
from bus_core.runtime import int8


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "data"))


def test_without_nncf_the_option_says_so_in_one_sentence(tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr("bus_core.bench.nncf_available", lambda: False)
    monkeypatch.setattr(int8, "nncf_available", lambda: False)
    assert bench(["--int8", "--model", str(tiny_model_dir)]) == 2
    captured = capsys.readouterr()
    assert [json.loads(line) for line in captured.out.splitlines()] == [
        {"figure": "error", "message": int8.NNCF_MISSING}]
    assert "Traceback" not in captured.err and "pip install nncf==3.4.0" in int8.NNCF_MISSING
    with pytest.raises(int8.QuantisationError, match="not installed"):
        int8.quantise(object(), [])


def test_a_missing_split_is_a_clear_data_error(busi_dir, tmp_path):
    with pytest.raises(DataError, match="No split file"):
        int8.split_subset(busi_dir, tmp_path / "none.json", "val")


def test_the_rule_needs_agreement_and_the_same_malignant_sensitivity():
    classes = ["normal", "benign", "malignant"]
    truth = [2, 2, 1, 0]
    reference = np.eye(3)[truth] * 5
    assert int8.agreement(reference, reference + 0.01, truth, classes, 1.0).meets_rule
    missed = reference.copy()
    missed[0] = [0, 5, 0]  # one cancer called benign: 75% agreement, sensitivity 1 -> 0.5
    result = int8.agreement(reference, missed, truth, classes, 1.0)
    assert not result.meets_rule and result.label_agreement == 0.75
    assert (result.malignant_sensitivity, result.fp32_malignant_sensitivity) == (0.5, 1.0)


@pytest.mark.slow
def test_tiny_quantisation_round_trip(tiny_model_dir, busi_dir, tmp_path, capsys):
    pytest.importorskip("nncf")
    split = tmp_path / "split.json"
    assert cli(["split", "--data", str(busi_dir), "--out", str(split)]) == 0
    capsys.readouterr()
    assert bench(["--int8", "--quick", "--model", str(tiny_model_dir), "--data", str(busi_dir),
                  "--split", str(split)]) == 0
    figures = {line["figure"]: line
               for line in map(json.loads, capsys.readouterr().out.splitlines())}
    ptq = figures["int8_agreement_with_fp32"]
    assert ptq["n"] == len(json.loads(split.read_text())["val"]) and ptq["subset"] == "val"
    # a share of the n validation images, and the verdict is the rule applied to the figures
    assert ptq["label_agreement"] * ptq["n"] == pytest.approx(round(ptq["label_agreement"]
                                                                    * ptq["n"]), abs=0.01)
    assert ptq["meets_rule"] == (ptq["label_agreement"] >= int8.MIN_AGREEMENT
                                 and ptq["malignant_sensitivity"]
                                 == ptq["fp32_malignant_sensitivity"])
    assert 0 <= ptq["max_probability_diff"] <= 1
    # every precision compared is timed in the same run, and the speed-ups are those times' ratios
    timing = figures["forward_latency_batch1"]
    latency = timing["p50_ms"]
    assert {"fp32", "int8"} <= set(latency) and min(latency.values()) > 0
    assert set(timing["speedup_over_fp32"]) == set(latency) - {"fp32"}
    assert timing["speedup_over_fp32"]["int8"] == pytest.approx(
        latency["fp32"] / latency["int8"], abs=0.01)


@pytest.mark.slow
def test_accuracy_aware_quantisation_keeps_the_labels(tiny_model_dir):
    pytest.importorskip("nncf")
    import openvino as ov

    from bus_core.models.build import load_model
    from bus_core.runtime.backends import openvino_ir

    loaded = load_model(tiny_model_dir)
    fp32 = ov.Core().read_model(openvino_ir(loaded.model, loaded.weights_id, (32, 32)))
    batches = [np.random.default_rng(i).normal(size=(1, 3, 32, 32)).astype(np.float32)
               for i in range(4)]
    reference = int8.compile_for_cpu(fp32, "f32")
    labels = [int(reference(x).argmax()) for x in batches]
    quantised = int8.quantise(fp32, batches, list(zip(batches, labels)))
    forward = int8.compile_for_cpu(quantised, "f32")
    assert [int(forward(x).argmax()) for x in batches] == labels
