"""End to end on a few real BUSI images: train 1 epoch, evaluate and predict via the CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bus_core", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=600)


@pytest.mark.slow
def test_train_evaluate_predict_on_busi(busi_or_skip, tmp_path):
    out = tmp_path / "model"
    r = run("train", "--data", str(busi_or_skip), "--out", str(out), "--max-per-class", "8",
            "--epochs", "1", "--batch-size", "4", "--resize", "72", "--crop", "64")
    assert r.returncode == 0, r.stderr[-2000:]
    card = json.loads((out / "card.json").read_text())
    split = card["split"]["file"]
    metrics = tmp_path / "metrics.json"
    r = run("evaluate", "--model", str(out), "--data", str(busi_or_skip), "--split", split,
            "--subset", "test", "--json", str(metrics))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(metrics.read_text())["n"] == len(json.loads(Path(split).read_text())["test"])
    image = busi_or_skip / "malignant" / "malignant (1).png"
    if not image.exists():
        image = next((busi_or_skip / "malignant").glob("*).png"))
    r = run("predict", str(image), "--model", str(out), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["label"] in ("normal", "benign", "malignant")
