import json
import os

import pytest

from bus_core import bench as bench_module
from bus_core.bench import main as bench
from bus_core.bench import ratio_stats, speed_table, write_table
from bus_core.cli.main import main as cli
from bus_core.runtime.backends import interleaved_times


@pytest.mark.slow
def test_quick_bench_prints_every_figure_as_json(tiny_model_dir, tiny_segmenter_dir, busi_dir,
                                                 tmp_path, capsys):
    split = tmp_path / "split.json"
    assert cli(["split", "--data", str(busi_dir), "--out", str(split)]) == 0
    capsys.readouterr()
    assert bench(["--quick", "--model", str(tiny_model_dir), "--data", str(busi_dir),
                  "--split", str(split), "--segmenter", str(tiny_segmenter_dir)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    figures = {line["figure"]: line for line in lines}
    assert list(figures) == ["machine", "model_load", "cold_start", "backend",
                             "latency_single_image", "gradcam_latency",
                             "training_throughput", "training_pipeline", "agreement_with_fp32",
                             "segmentation_latency", "batch_prediction_throughput",
                             "worklist", "openvino_cache"]
    worklist = figures["worklist"]
    assert (worklist["cases"], worklist["database"]) == (5000, "sqlite")
    assert worklist["first_page"]["p50_ms"] > 0 and worklist["last_page"]["p50_ms"] > 0
    assert figures["openvino_cache"]["pruned_mb"] >= 0
    cold = figures["cold_start"]
    assert cold["first_reading_s"] > 0 and cold["after_warmup_s"] > 0 and cold["warm_s"] > 0
    assert len(figures["machine"]["load_average"]) == 3
    assert figures["segmentation_latency"]["p50_ms"] > 0
    latency = figures["latency_single_image"]
    assert latency["naive"]["p50_ms"] > 0 and latency["optimised"]["p95_ms"] > 0
    assert latency["pytorch"]["p50_ms"] > 0 and latency["backend"] == figures["backend"]["chosen"]
    assert latency["ratio"]["median"] > 0 and latency["ratio"]["pairs"] == 10
    assert figures["training_throughput"]["ratio"]["median"] > 0
    pipeline = figures["training_pipeline"]
    assert pipeline["pipeline_images_per_s"] > 0 and pipeline["model_only_images_per_s"] > 0
    assert pipeline["ratio"] > 0 and pipeline["batch"] == 4 and pipeline["workers"] >= 1
    agreement = figures["agreement_with_fp32"]
    assert agreement["n"] == len(json.loads(split.read_text())["test"])
    # a share of the n test images; the same untrained model on both paths: probabilities close
    assert agreement["label_agreement"] * agreement["n"] == pytest.approx(
        round(agreement["label_agreement"] * agreement["n"]), abs=0.01)
    assert 0 <= agreement["max_probability_diff"] < 0.05
    batch = figures["batch_prediction_throughput"]
    assert batch["n"] == 32 and batch["backend"] == figures["backend"]["chosen"]
    assert batch["one_by_one_images_per_s"] > 0 and batch["ratio"] > 0


def test_bench_without_a_model_says_so(monkeypatch, capsys):
    monkeypatch.setattr("bus_core.bench.active_model_path", lambda: None)
    assert bench(["--quick"]) == 2
    assert "no model installed" in capsys.readouterr().out


def test_naive_path_fits_the_image_as_the_card_says(tiny_model_dir):
    import io

    import numpy as np
    import torch
    from PIL import Image

    from bus_core.bench import naive_predict
    from bus_core.data.presets import InputSize, eval_transform
    from bus_core.models.build import load_model

    model = load_model(tiny_model_dir).model
    image = np.random.default_rng(0).integers(0, 255, (50, 90, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    for size in (InputSize(40, 32, "crop"), InputSize(32, 32, "pad")):
        with torch.inference_mode():
            reference = model(eval_transform(size)(image).unsqueeze(0)).numpy()
        assert np.allclose(naive_predict(model, buf.getvalue(), size), reference, atol=1e-2)


def test_ratios_are_the_median_and_iqr_of_the_pairs():
    stats = ratio_stats([10, 20, 30, 40], [5, 10, 10, 40])  # pairs: 2, 2, 3, 1
    assert stats == {"median": 2.0, "iqr": [1.75, 2.25], "pairs": 4}
    with pytest.raises(ValueError):
        ratio_stats([1, 2], [1])


def test_repetitions_are_timed_in_turns():
    calls: list[str] = []
    times = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                              n=3, warmup=1)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-ups first, then A, B, A, B...
    assert {name: len(ms) for name, ms in times.items()} == {"a": 3, "b": 3}


def test_a_busy_machine_gets_no_speed_table_unless_forced(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.5, 1.0, 0.5))
    monkeypatch.setattr(bench_module, "active_model_path", lambda: None)
    table = tmp_path / "speed.md"
    assert bench(["--quick", "--table", str(table)]) == 3
    assert "busy (load average 2.50 over 1 minute, 2 CPUs)" in capsys.readouterr().out
    assert not table.exists()
    assert bench(["--quick", "--table", str(table), "--force"]) == 2  # past the refusal
    machine = json.loads(capsys.readouterr().out.splitlines()[0])
    assert machine["load_average"] == [2.5, 1.0, 0.5] and machine["busy"] is True
    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.0, 0.5))
    assert bench(["--quick", "--table", str(table)]) == 2  # quiet enough: not refused


FIGURES = [
    {"figure": "machine", "cpu": "Intel Xeon", "cpu_flags": ["AMX", "AVX512-BF16"],
     "cpu_count": 2, "physical_cores": 2, "load_average": [0.4, 0.3, 0.2], "date": "2026-12-04",
     "busy": False, "torch": "2.14.1", "openvino": "2026.4.1", "quick": True},
    {"figure": "cold_start", "first_reading_s": 50.1, "after_warmup_s": 8.7, "warm_s": 1.0},
    {"figure": "two_stage_latency", "pytorch": {"p50_ms": 200.0}, "optimised": {"p50_ms": 100.0},
     "stages_p50_ms": {"whole": 50.0, "outline": 60.0, "lesion": 20.0},
     "ratio": {"median": 2.0, "iqr": [1.8, 2.2], "pairs": 10},
     "one_at_a_time_ratio": {"median": 1.1, "iqr": [1.0, 1.2], "pairs": 10}},
    {"figure": "worklist", "cases": 5000, "database": "sqlite", "first_page": {"p50_ms": 6.1},
     "last_page": {"p50_ms": 3.2}},
    {"figure": "openvino_cache", "mb": 120.5, "pruned_mb": 3.0},
]


def test_the_speed_table_names_machine_flags_and_date_and_replaces_the_last(tmp_path):
    table = speed_table(FIGURES)
    assert table.startswith("2026-12-04, Intel Xeon (AMX, AVX512-BF16), 2 CPUs (2 cores), "
                            "load average 0.40")
    assert "busy" not in table and "busy" in speed_table(
        [{**FIGURES[0], "busy": True, "load_average": [5.0, 5.0, 5.0]}])
    assert "| 50.1 s / 8.7 s (`warm` 1.0 s) |" in table
    assert "whole 50.0 ms, outline 60.0 ms, lesion 20.0 ms" in table
    assert "2.00 (IQR 1.80-2.20, 10 pairs)" in table and "120.5 MB (3.0 MB removed)" in table
    assert "| review worklist, 5000 cases (sqlite): first page / last page p50 | 6.1 / 3.2 ms |" \
        in table
    assert "| two-stage one model at a time / side by side, per pair | 1.10 (IQR" in table
    figures = [dict(f) for f in FIGURES]
    figures[2]["apart_ratio"] = figures[2].pop("one_at_a_time_ratio")
    shared = speed_table(figures)
    assert "| two-stage first stage as two networks / as one, per pair | 1.10 (IQR" in shared
    assert "one model at a time" not in shared
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Speed\n\n<!-- speed-table -->\nstale figures\n<!-- /speed-table -->\n"
                   "\nAfter.\n")
    write_table(doc, table)
    write_table(doc, table)
    text = doc.read_text()
    assert text.startswith("# Speed\n") and text.endswith("\nAfter.\n")
    assert "stale figures" not in text and text.count("AVX512-BF16") == 1
    other = tmp_path / "new.md"
    write_table(other, "x\n")
    assert other.read_text() == "<!-- speed-table -->\nx\n<!-- /speed-table -->\n"
