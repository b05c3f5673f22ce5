"""`python -m bus_core compare` on tiny synthetic data: the table, resumption, the threshold
columns, refusals, and the Evaluate page's view of a comparison run."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

import bus_core.cli.main as cli
from bus_core.data.dataset import load_records
from bus_core.data.splits import load_split, make_split, save_split, split_records
from bus_core.errors import CompareError
from bus_core.evaluation.evaluate import evaluate
from bus_core.metrics import fit_malignant_threshold, threshold_metrics
from bus_core.models.build import load_model
from bus_core.training import architectures as compare
from bus_core.training.runs import read_progress
from tests.conftest import signed_in_app

TINY = ["--resize", "40", "--crop", "32", "--epochs", "1", "--batch-size", "4",
        "--device", "cpu-fp32"]


@pytest.fixture(scope="module")
def split_file(busi_dir, tmp_path_factory) -> Path:
    return save_split(make_split(load_records(busi_dir), seed=0),
                      tmp_path_factory.mktemp("split") / "split.json")


def argv(busi_dir, split_file, out, *rows: str, extra: tuple[str, ...] = ()) -> list[str]:
    return ["compare", "--data", str(busi_dir), "--split", str(split_file), "--out", str(out),
            "--archs", *rows, *TINY, *extra]


@pytest.fixture(scope="module")
def finished(busi_dir, split_file, tmp_path_factory) -> Path:
    """A finished two-row comparison (DenseNet121 with Adam, ResNet50 with SGD)."""
    out = tmp_path_factory.mktemp("compare") / "run"
    assert cli.main(argv(busi_dir, split_file, out, "densenet121", "resnet50:sgd")) == 0
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_the_table_has_every_column_for_every_row(finished):
    with open(finished / "results.csv", newline="") as fh:
        assert next(csv.reader(fh)) == list(compare.ROW_COLUMNS)
    rows = read_csv(finished / "results.csv")
    assert [r["row"] for r in rows] == ["densenet121-adam", "resnet50-sgd"]
    for row in rows:
        assert row["init"] == "random" and row["epochs"] == "1" and row["best_epoch"] == "1"
        assert row["input_px"] == "40 / 32" and row["device"] == "CPU, fp32"
        assert int(row["parameters"]) > 1_000_000 and float(row["inference_ms"]) > 0
        assert float(row["training_time_s"]) > 0 and float(row["test_loss"]) > 0
        for key in ("accuracy", "malignant_sensitivity", "malignant_specificity", "macro_f1",
                    "ece", "sensitivity_at_threshold", "specificity_at_threshold"):
            assert 0 <= float(row[key]) <= 1, key
    markdown = (finished / "results.md").read_text()
    assert "| malignant sensitivity | sensitivity at threshold |" in markdown
    assert markdown.count("\n| densenet121-adam |") == 1 and "| resnet50-sgd |" in markdown
    saved = compare.read_results(finished)
    assert saved["settings"]["balance"] == "weights"  # the published comparison's class weights
    assert all(r["roc"]["fpr"][0] == 0 and r["roc"]["tpr"][-1] == 1 for r in saved["rows"])


@pytest.mark.slow
def test_threshold_is_chosen_on_validation_and_scored_on_test(finished, busi_dir):
    row = compare.read_results(finished)["rows"][0]
    model = load_model(row["model"])
    records = load_records(busi_dir)
    split = load_split(Path(row["model"]) / "train" / "split.json")
    val, test = (evaluate(model, split_records(records, split, s), device="cpu-fp32",
                          backend="torch") for s in ("val", "test"))
    threshold = fit_malignant_threshold(val.y_true, val.probs, target_sensitivity=0.90)
    at = threshold_metrics(test.y_true, test.probs, threshold)
    assert row["threshold"] == pytest.approx(threshold, abs=1e-6)
    assert row["sensitivity_at_threshold"] == at["sensitivity"]
    assert row["specificity_at_threshold"] == at["specificity"]
    assert row["accuracy"] == test.metrics["accuracy"] and row["n_test"] == len(test.y_true)


@pytest.mark.slow
def test_a_second_call_skips_finished_rows(finished, busi_dir, split_file, monkeypatch, capsys):
    before = {p: p.stat().st_mtime_ns for p in finished.glob("*/model.safetensors")}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished row was trained again")

    monkeypatch.setattr(compare, "train", no_training)
    monkeypatch.setattr(compare, "score_row", no_training)
    assert cli.main(argv(busi_dir, split_file, finished, "densenet121", "resnet50:sgd")) == 0
    assert {p: p.stat().st_mtime_ns for p in finished.glob("*/model.safetensors")} == before
    assert "densenet121-adam: accuracy" in capsys.readouterr().out
    assert len(read_csv(finished / "results.csv")) == 2


@pytest.mark.slow
def test_a_stopped_comparison_resumes_its_unfinished_row(busi_dir, split_file, tmp_path):
    args = compare.get_args_parser().parse_args(
        argv(busi_dir, split_file, tmp_path, "densenet121", "densenet121:sgd")[1:])
    configs = compare.row_configs(args)
    steps = iter(range(100))

    def stop_in_the_second_row() -> bool:
        return Path(configs[1].out, "train", "progress.jsonl").is_file() and next(steps) >= 1

    assert compare.compare(configs, tmp_path, should_stop=stop_in_the_second_row) is None
    assert [r["row"] for r in read_csv(tmp_path / "results.csv")] == ["densenet121-adam"]
    assert (tmp_path / "densenet121-sgd" / "train" / "checkpoint.pt").is_file()
    rows = compare.compare(configs, tmp_path)
    assert rows is not None and [r["row"] for r in rows] == ["densenet121-adam",
                                                               "densenet121-sgd"]
    starts = [e for e in read_progress(tmp_path / "densenet121-sgd" / "train" / "progress.jsonl")
              if e["event"] == "start"]
    assert [s["resumed"] for s in starts] == [False, True]
    assert len(read_csv(tmp_path / "results.csv")) == 2


@pytest.mark.slow
def test_a_row_trained_with_other_settings_is_refused(finished, busi_dir, split_file, capsys):
    code = cli.main(argv(busi_dir, split_file, finished, "densenet121",
                         extra=("--epochs", "2")))
    assert code == 2
    err = capsys.readouterr().err
    assert "was trained with other settings (epochs 1 there, 2 now)" in err


@pytest.mark.parametrize(("rows", "extra", "message"), [
    (["inception_v3:rmsprop"], (), "InceptionV3 needs inputs of at least 75 px"),
    (["lenet"], (), "is not a comparison row"),
    (["vgg16", "vgg16:adam"], (), "given twice"),
    (["vgg16"], ("--init", "random", "--init", "imagenet"), "Give one --init policy"),
])
def test_bad_rows_are_refused_before_training(busi_dir, split_file, tmp_path, rows, extra,
                                              message):
    args = compare.get_args_parser().parse_args(
        argv(busi_dir, split_file, tmp_path, *rows, extra=extra)[1:])
    with pytest.raises(CompareError, match=message):
        compare.row_configs(args)
    assert not any(tmp_path.iterdir())


def test_initialisation_policy_per_row(busi_dir, split_file, tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "imagenet_cached", lambda arch: arch != "vgg16")
    args = compare.get_args_parser().parse_args(argv(
        busi_dir, split_file, tmp_path, "densenet121", "resnet50",
        extra=("--init", "imagenet", "--init", "densenet121=weights/x"))[1:])
    assert [c.init for c in compare.row_configs(args)] == ["weights/x", "imagenet"]
    args.archs = ["vgg16"]
    with pytest.raises(CompareError, match="no ImageNet weights for vgg16"):
        compare.row_configs(args)


@pytest.mark.slow
def test_the_evaluate_page_shows_a_comparison_run(finished, monkeypatch, tmp_path):
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    # the project's own runs/ may hold real comparisons: look only where this test writes
    monkeypatch.setattr(compare, "PROJECT_ROOT", tmp_path / "project")
    at = signed_in_app(timeout=90)
    at.run()
    at.switch_page("pages/evaluate.py").run()
    at.radio(key="eval_view").set_value("Architecture comparison runs").run()
    assert not at.exception, [e.value for e in at.exception]
    assert "No comparison run yet" in " ".join(c.value for c in at.caption)
    shutil.copytree(finished, tmp_path / "userdata" / "runs" / "compare")
    at.run()
    at.selectbox(key="eval_compare_run").set_value(tmp_path / "userdata" / "runs" / "compare")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[0].value
    assert list(table["row"]) == ["densenet121-adam", "resnet50-sgd"]
    assert {"malignant sensitivity", "sensitivity at threshold", "specificity at threshold",
            "training s", "device", "parameters", "inference ms / image"} <= set(table.columns)
    figure = json.loads(at.get("plotly_chart")[0].proto.spec)
    names = [trace.get("name") for trace in figure["data"]]
    assert any(str(n).startswith("densenet121-adam (AUC") for n in names)
    assert any(str(n).startswith("resnet50-sgd (AUC") for n in names)
