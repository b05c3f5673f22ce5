import json

import pytest

from bus_core.bench import main as bench
from bus_core.cli import main as cli


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
    assert list(figures) == ["machine", "model_load", "backend", "latency_single_image",
                             "gradcam_latency",
                             "training_throughput", "training_pipeline", "agreement_with_fp32",
                             "segmentation_latency", "batch_prediction_throughput"]
    assert figures["segmentation_latency"]["p50_ms"] > 0
    latency = figures["latency_single_image"]
    assert latency["naive"]["p50_ms"] > 0 and latency["optimised"]["p95_ms"] > 0
    assert latency["pytorch"]["p50_ms"] > 0 and latency["backend"] == figures["backend"]["chosen"]
    assert latency["ratio_p50"] > 0
    assert figures["training_throughput"]["ratio"] > 0
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
    from bus_core.models import load_model
    from bus_core.transforms import InputSize, eval_transform

    model = load_model(tiny_model_dir).model
    image = np.random.default_rng(0).integers(0, 255, (50, 90, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    for size in (InputSize(40, 32, "crop"), InputSize(32, 32, "pad")):
        with torch.inference_mode():
            reference = model(eval_transform(size)(image).unsqueeze(0)).numpy()
        assert np.allclose(naive_predict(model, buf.getvalue(), size), reference, atol=1e-2)
