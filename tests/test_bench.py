import json

from bus_core.bench import main as bench
from bus_core.cli import main as cli


def test_quick_bench_prints_every_figure_as_json(tiny_model_dir, busi_dir, tmp_path, capsys):
    split = tmp_path / "split.json"
    assert cli(["split", "--data", str(busi_dir), "--out", str(split)]) == 0
    capsys.readouterr()
    assert bench(["--quick", "--model", str(tiny_model_dir), "--data", str(busi_dir),
                  "--split", str(split)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    figures = {line["figure"]: line for line in lines}
    assert list(figures) == ["machine", "model_load", "latency_single_image", "gradcam_latency",
                             "training_throughput", "agreement_with_fp32"]
    latency = figures["latency_single_image"]
    assert latency["naive"]["p50_ms"] > 0 and latency["optimised"]["p95_ms"] > 0
    assert latency["ratio_p50"] > 0
    assert figures["training_throughput"]["ratio"] > 0
    agreement = figures["agreement_with_fp32"]
    assert agreement["n"] == len(json.loads(split.read_text())["test"])
    assert 0 <= agreement["label_agreement"] <= 1


def test_bench_without_a_model_says_so(monkeypatch, capsys):
    monkeypatch.setattr("bus_core.bench.active_model_path", lambda: None)
    assert bench(["--quick"]) == 2
    assert "no model installed" in capsys.readouterr().out
