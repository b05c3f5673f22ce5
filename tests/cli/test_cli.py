import json
import shutil

import numpy as np
import pytest
from PIL import Image

from bus_core.cli.main import main
from bus_core.data.dataset import load_records


def test_predict_json(tiny_model_dir, busi_dir, capsys, tmp_path):
    image = busi_dir / "malignant" / "malignant (1).png"
    cam = tmp_path / "cam.png"
    assert main(["predict", str(image), "--model", str(tiny_model_dir), "--json",
                 "--cam", str(cam), "--device", "cpu-fp32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"label", "probabilities", "model"} <= set(out)
    assert out["model"] == "tiny-test"
    assert Image.open(cam).size == (32, 32)


def test_predict_bad_file_is_one_line_error(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert main(["predict", str(bad), "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "Traceback" not in err


def test_evaluate_json_keys(tiny_model_dir, busi_dir, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(busi_dir),
                 "--json", str(out), "--device", "cpu-fp32"]) == 0
    metrics = json.loads(out.read_text())
    assert {"n", "labels", "accuracy", "macro_f1", "malignant_sensitivity",
            "malignant_specificity", "auc_macro_ovr", "auc_malignant", "ece", "per_class",
            "confusion_matrix"} <= set(metrics)
    assert metrics["n"] == 18
    assert np.array(metrics["confusion_matrix"]).sum() == 18
    for key in ("accuracy", "macro_f1", "malignant_sensitivity", "malignant_specificity",
                "auc_malignant", "auc_macro_ovr"):
        low, high = metrics[f"{key}_ci95"]
        assert low <= metrics[key] <= high, key
    assert metrics["ci95"]["resamples"] == 2000
    assert "by_source" not in metrics  # one data folder, one source


def test_evaluate_several_sources_with_a_threshold(tiny_model_dir, busi_dir, tmp_path, capsys):
    other = tmp_path / "Other"
    shutil.copytree(busi_dir, other)
    out = tmp_path / "m.json"
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(busi_dir),
                 "--data", str(other), "--malignant-threshold", "0.3", "--json", str(out),
                 "--device", "cpu-fp32"]) == 0
    text = capsys.readouterr().out
    metrics = json.loads(out.read_text())
    assert set(metrics["by_source"]) == {busi_dir.name, "Other"}
    for part in metrics["by_source"].values():
        assert part["n"] == 18 and part["at_threshold"]["threshold"] == 0.3
        assert len(part["accuracy_ci95"]) == 2 and "sensitivity_ci95" in part["at_threshold"]
    assert len(metrics["at_threshold"]["specificity_ci95"]) == 2
    assert f"source {busi_dir.name}: n = 18" in text and "source Other: n = 18" in text


def test_split_then_evaluate_subset(tiny_model_dir, busi_dir, tmp_path):
    split = tmp_path / "split.json"
    assert main(["split", "--data", str(busi_dir), "--out", str(split)]) == 0
    data = json.loads(split.read_text())
    assert {"train", "val", "test", "seed", "data_hash"} <= set(data)
    out = tmp_path / "m.json"
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(busi_dir),
                 "--split", str(split), "--subset", "test", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["n"] == len(data["test"])


def test_split_hold_out_from_a_base_split(busi_dir, tmp_path, capsys):
    base = tmp_path / "split.json"
    assert main(["split", "--data", str(busi_dir), "--out", str(base)]) == 0
    content = json.loads(base.read_text())
    held = content["train"][:2] + content["test"][:2]
    ids = tmp_path / "site.txt"
    ids.write_text("\n".join(held) + "\n")
    out = tmp_path / "loso.json"
    assert main(["split", "--data", str(busi_dir), "--base", str(base), "--hold-out", str(ids),
                 "--out", str(out)]) == 0
    loso = json.loads(out.read_text())
    assert loso["test"] == sorted(content["test"][:2]) and not set(held) & set(loso["train"])
    assert main(["split", "--data", str(busi_dir), "--hold-out", str(ids), "--out",
                 str(out)]) == 2
    assert "--hold-out needs --base" in capsys.readouterr().err


@pytest.mark.slow
def test_tune_small_grid(busi_dir, tmp_path, capsys):
    out = tmp_path / "tune"
    assert main(["tune", "--data", str(busi_dir), "--out", str(out), "--epochs", "1",
                 "--resize", "40", "--crop", "32", "--batch-size", "4", "--device", "cpu-fp32",
                 "--grid", "lr=0.001,0.0001", "--grid", "optimizer=adam"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert len(rows) == 2 and {r["lr"] for r in rows} == {0.001, 0.0001}
    assert (out / "results.csv").is_file()


def test_leak_command_shows_black_normals_in_mask_mode_only(busi_dir, tmp_path, capsys):
    out = tmp_path / "leak.json"
    assert main(["leak", "--data", str(busi_dir), "--json", str(out)]) == 0
    shares = json.loads(out.read_text())["black_share"]
    assert shares["mask"]["normal"]["black_share"] == 1.0
    assert shares["mask"]["benign"]["black_share"] == 0.0
    assert shares["mask-leakfree"]["normal"]["black_share"] == 0.0
    assert shares["full"]["normal"]["black_share"] == 0.0
    assert "mask-leakfree" in capsys.readouterr().out


def test_manifest_of_a_split_subset(busi_dir, tmp_path, capsys):
    split = tmp_path / "split.json"
    assert main(["split", "--data", str(busi_dir), "--out", str(split)]) == 0
    out = tmp_path / "train.csv"
    assert main(["manifest", "--data", str(busi_dir), "--split", str(split), "--subset", "train",
                 "--out", str(out)]) == 0
    train = json.loads(split.read_text())["train"]
    assert len(load_records(out)) == len(train)
    assert f"{len(train)} images (train:" in capsys.readouterr().out


def test_log_level_comes_from_the_environment(monkeypatch):
    import logging

    from bus_core.settings import configure_logging

    monkeypatch.setenv("BUS_LOG_LEVEL", "debug")
    configure_logging()
    assert logging.getLogger("bus_core").level == logging.DEBUG
    monkeypatch.setenv("BUS_LOG_LEVEL", "nonsense")
    configure_logging()
    assert logging.getLogger("bus_core").level == logging.WARNING


def test_a_header_only_manifest_is_refused(tmp_path, tiny_model_dir, capsys):
    from bus_core.cli.main import main

    manifest = tmp_path / "empty.csv"
    manifest.write_text("path,label\n")
    assert main(["split", "--data", str(manifest), "--out", str(tmp_path / "s.json")]) == 2
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(manifest)]) == 2
    assert "no labelled images" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_outputs_make_missing_folders(tiny_model_dir, busi_dir, tmp_path):
    image = busi_dir / "benign" / "benign (1).png"
    cam, json_out = tmp_path / "new" / "cam.png", tmp_path / "new" / "deeper" / "m.json"
    assert main(["predict", str(image), "--model", str(tiny_model_dir), "--cam", str(cam),
                 "--device", "cpu-fp32"]) == 0
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(busi_dir),
                 "--json", str(json_out), "--device", "cpu-fp32"]) == 0
    assert cam.is_file() and json.loads(json_out.read_text())["n"] == 18


def test_unwritable_outputs_are_one_line_errors(tiny_model_dir, busi_dir, tmp_path, capsys,
                                                monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where a folder should be")
    image = busi_dir / "benign" / "benign (1).png"
    assert main(["predict", str(image), "--model", str(tiny_model_dir), "--device", "cpu-fp32",
                 "--cam", str(blocker / "cam.png")]) == 2
    _one_line_error(capsys, "Could not write", "a-file")
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(busi_dir),
                 "--json", str(blocker / "m.json"), "--device", "cpu-fp32"]) == 2
    _one_line_error(capsys, "Could not write")
    assert main(["split", "--data", str(busi_dir), "--out", str(blocker / "split.json")]) == 2
    _one_line_error(capsys, "Could not save the split file")
    assert main(["train", "--data", str(busi_dir), "--out", str(blocker / "run"),
                 "--epochs", "1", "--device", "cpu-fp32"]) == 2
    _one_line_error(capsys, "Could not write the run folder")
    monkeypatch.setenv("BUS_DATA_DIR", str(blocker))
    assert main(["models", "--activate", str(tiny_model_dir)]) == 2
    _one_line_error(capsys, "Could not use the data folder")


def test_unavailable_device_is_one_line_error(busi_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["train", "--data", str(busi_dir), "--out", str(tmp_path / "run"),
                 "--epochs", "1", "--device", "cuda"]) == 2
    _one_line_error(capsys, "No CUDA GPU")


@pytest.mark.slow
def test_predict_and_evaluate_take_a_backend(tiny_model_dir, busi_dir, capsys, tmp_path):
    image = busi_dir / "benign" / "benign (1).png"
    labels = []
    for backend in ("torch", "openvino"):
        assert main(["predict", str(image), "--model", str(tiny_model_dir), "--json",
                     "--device", "cpu-fp32", "--backend", backend]) == 0
        labels.append(json.loads(capsys.readouterr().out)["label"])
    assert labels[0] == labels[1]
    out = tmp_path / "m.json"
    assert main(["evaluate", "--model", str(tiny_model_dir), "--data", str(busi_dir),
                 "--json", str(out), "--device", "cpu-fp32", "--backend", "torch"]) == 0
    assert json.loads(out.read_text())["n"] == 18


def test_predict_many_into_a_csv_and_resume(tiny_model_dir, busi_dir, tmp_path, capsys):
    out = tmp_path / "results.csv"
    args = ["predict", str(busi_dir / "benign"), str(busi_dir / "normal" / "normal (1).png"),
            "--out", str(out), "--model", str(tiny_model_dir), "--device", "cpu-fp32",
            "--backend", "torch", "--workers", "0", "--batch-size", "4"]
    assert main(args) == 0
    summary = capsys.readouterr().out
    assert summary.startswith("7 images predicted (0 errors, 0 already in")
    assert "images/s" in summary
    assert len(out.read_text().splitlines()) == 8
    assert main(args) == 0
    assert capsys.readouterr().out.startswith("0 images predicted (0 errors, 7 already in")


def test_predict_several_images_needs_out_and_out_takes_no_single_image_options(
        tiny_model_dir, busi_dir, tmp_path, capsys):
    image = str(busi_dir / "benign" / "benign (1).png")
    assert main(["predict", image, image, "--model", str(tiny_model_dir)]) == 2
    _one_line_error(capsys, "--out results.csv")
    assert main(["predict", image, "--out", str(tmp_path / "r.csv"), "--json", "--model",
                 str(tiny_model_dir)]) == 2
    _one_line_error(capsys, "--json are for one image")
    assert not (tmp_path / "r.csv").exists()
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    assert main(["predict", str(bad), "--out", str(tmp_path / "r.csv"), "--model",
                 str(tiny_model_dir), "--workers", "0"]) == 2
    assert capsys.readouterr().out.startswith("1 image predicted (1 error,")


def test_evaluate_scores_an_outline_model_as_served_unless_expert_outlines_are_asked_for(
        busi_dir, tiny_model_dir, tiny_segmenter_dir, tmp_path, monkeypatch, capsys):
    from bus_core.inference.outline import Segmenter
    from tests.conftest import blob_probabilities, copy_model

    monkeypatch.setattr(Segmenter, "probabilities", blob_probabilities)
    monkeypatch.setenv("BUS_SEGMENTER", str(tiny_segmenter_dir))
    lesion = copy_model(tiny_model_dir, tmp_path / "lesion", input_mode="lesion-context",
                        crop_margin=0.5)
    out = tmp_path / "m.json"
    for extra, masks in (([], "automatic"), (["--masks", "expert"], "expert")):
        assert main(["evaluate", "--model", str(lesion), "--data", str(busi_dir), "--json",
                     str(out), "--device", "cpu-fp32", *extra]) == 0
        assert json.loads(out.read_text())["data"]["masks"] == masks
        assert "outlined_but_normal" in json.loads(out.read_text())
    assert "scored on the data's expert outlines" in capsys.readouterr().out
