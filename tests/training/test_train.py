import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bus_core.models.build import load_model
from bus_core.training.runs import read_progress, run_state
from bus_core.training.train import TrainConfig, config_from_args, get_args_parser, train

REPO = Path(__file__).resolve().parents[2]


def tiny_config(busi_dir, out, **kw) -> TrainConfig:
    return TrainConfig(data=[str(busi_dir)], out=str(out), resize=40, crop=32, batch_size=4,
                       epochs=kw.pop("epochs", 1), device="cpu-fp32",
                       save_dtype=kw.pop("save_dtype", "float32"), **kw)


def test_parser_maps_to_config():
    args = get_args_parser().parse_args(["--data", "d", "--out", "o", "--lr", "0.001",
                                         "--optimizer", "sgd", "--balance", "weights"])
    config = config_from_args(args)
    assert config.lr == 0.001 and config.optimizer == "sgd" and config.data == ["d"]
    assert config.workers is None and config.worker_count >= 1
    args = get_args_parser().parse_args(["--data", "d", "--out", "o", "--workers", "0"])
    assert config_from_args(args).worker_count == 0


@pytest.mark.slow
def test_one_epoch_writes_model_card_progress_and_split(busi_dir, tmp_path):
    result = train(tiny_config(busi_dir, tmp_path / "m"))
    assert result.status == "done"
    loaded = load_model(tmp_path / "m")
    card = loaded.card
    assert card.input_size == {"resize": 40, "crop": 32, "fit": "crop"}
    assert set(card.metrics) >= {"val", "test", "history"}
    assert card.metrics["test"]["data"]["subset"] == "test"
    assert card.metrics["test"]["n"] == card.metrics["test"]["data"]["n"] > 0
    assert card.split["data_hash"] and card.training_time_s > 0
    events = read_progress(tmp_path / "m" / "train" / "progress.jsonl")
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and "epoch" in kinds
    step = next(e for e in events if e["event"] == "step")
    assert {"epoch", "step", "loss", "accuracy", "lr", "images_per_s", "eta_s"} <= set(step)
    assert run_state(events) == "done"


@pytest.mark.slow
def test_card_figures_describe_the_saved_float16_weights(busi_dir, tmp_path):
    from bus_core.data.dataset import load_records
    from bus_core.data.splits import load_split, split_records
    from bus_core.evaluation.evaluate import evaluate

    result = train(tiny_config(busi_dir, tmp_path / "m", save_dtype="float16", seed=3))
    saved = result.card.metrics["test"]
    split = load_split(tmp_path / "m" / "train" / "split.json")
    test = split_records(load_records(busi_dir), split, "test")
    again = evaluate(load_model(tmp_path / "m"), test, device="cpu-fp32").metrics
    assert again["n"] == saved["n"] and again["accuracy"] == saved["accuracy"]
    assert again["ece"] == pytest.approx(saved["ece"], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer,balance,mode,workers", [("sgd", "weights", "mask-leakfree", 2),
                                                             ("rmsprop", "sampler", "mask", 1),
                                                             ("adamw", "none", "full", 0)])
def test_options_run(busi_dir, tmp_path, optimizer, balance, mode, workers):
    config = tiny_config(busi_dir, tmp_path / "m", optimizer=optimizer, balance=balance,
                         input_mode=mode, scheduler="plateau", monitor="loss", workers=workers)
    assert train(config).card.input_mode == mode


@pytest.mark.slow
def test_cancel_then_resume(busi_dir, tmp_path):
    out = tmp_path / "m"
    calls = {"n": 0}

    def stop_after_two_steps() -> bool:
        calls["n"] += 1
        return calls["n"] >= 2

    result = train(tiny_config(busi_dir, out, epochs=2), should_stop=stop_after_two_steps)
    assert result.status == "cancelled"
    assert run_state(read_progress(out / "train" / "progress.jsonl")) == "cancelled"
    result = train(tiny_config(busi_dir, out, epochs=2), resume=True)
    assert result.status == "done"
    events = read_progress(out / "train" / "progress.jsonl")
    resumed = [e for e in events if e["event"] == "start" and e["resumed"]]
    assert resumed and resumed[0]["step"] == 2
    epochs = [e["epoch"] for e in events if e["event"] == "epoch"]
    assert epochs == [1, 2]


@pytest.mark.slow
def test_resume_after_kill_9(busi_dir, tmp_path):
    """A run killed with SIGKILL mid-epoch resumes from its last checkpoint and finishes."""
    out = tmp_path / "m"
    cmd = [sys.executable, "-m", "bus_core", "train", "--data", str(busi_dir), "--out", str(out),
           "--resize", "40", "--crop", "32", "--batch-size", "2", "--epochs", "3",
           "--device", "cpu-fp32", "--checkpoint-every", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / "train" / "progress.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        steps = [e for e in read_progress(progress) if e["event"] == "step"]
        if len(steps) >= 3 and (out / "train" / "checkpoint.pt").is_file():
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    events = read_progress(progress)
    assert not (out / "card.json").exists(), "the run ended before it could be killed"
    assert sum(e["event"] == "step" for e in events) >= 3
    done = subprocess.run(cmd + ["--resume"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    card = load_model(out).card
    assert card.metrics["history"][-1]["epoch"] == 3
    events = read_progress(progress)
    assert any(e["event"] == "start" and e["resumed"] for e in events)


def test_resume_without_run_is_clear(tmp_path):
    from bus_core.cli.main import main

    assert main(["train", "--data", "x", "--out", str(tmp_path / "none"), "--resume"]) == 2


def test_lower_ece_and_loss_score_higher():
    from bus_core.training.train import score

    assert score({"ece": 0.05}, "ece") > score({"ece": 0.2}, "ece")
    assert score({"loss": 0.3}, "loss") > score({"loss": 0.9}, "loss")
    assert score({"macro_f1": 0.8}, "macro_f1") > score({"macro_f1": 0.7}, "macro_f1")


@pytest.mark.slow
def test_resume_takes_every_setting_from_the_run(busi_dir, tmp_path):
    from bus_core.cli.main import main

    out = tmp_path / "m"
    calls = {"n": 0}

    def stop_at_once() -> bool:
        calls["n"] += 1
        return True

    config = tiny_config(busi_dir, out, epochs=2)
    assert train(config, should_stop=stop_at_once).status == "cancelled"
    assert main(["train", "--resume", "--out", str(out)]) == 0  # no --data, no --epochs
    card = load_model(out).card
    assert card.hyperparameters["epochs"] == 2
    assert [h["epoch"] for h in card.metrics["history"]] == [1, 2]


def test_a_new_run_needs_data(tmp_path, capsys):
    from bus_core.cli.main import main

    assert main(["train", "--out", str(tmp_path / "m")]) == 2
    assert "--data" in capsys.readouterr().err


@pytest.mark.slow
def test_compile_wraps_the_training_network_only(busi_dir, tmp_path, monkeypatch):
    import torch

    modes = []

    def fake_compile(net, mode):  # a real compile takes minutes on a small CPU
        modes.append((type(net).__name__, mode))
        return net

    monkeypatch.setattr(torch, "compile", fake_compile)
    args = get_args_parser().parse_args(["--data", "d", "--out", "o", "--compile", "default"])
    assert config_from_args(args).compile == "default"
    result = train(tiny_config(busi_dir, tmp_path / "m", compile="reduce-overhead"))
    assert result.status == "done" and modes == [("DenseNetClassifier", "reduce-overhead")]
    assert load_model(tmp_path / "m").card.name == "m"  # weights saved from the eager model
    modes.clear()
    train(tiny_config(busi_dir, tmp_path / "n"))
    assert modes == []


def test_an_input_size_below_the_architecture_s_minimum_is_refused_before_the_run():
    from bus_core.errors import ModelError
    from bus_core.training.train import TrainConfig, check_config

    with pytest.raises(ModelError, match="at least 32 px; 16 px"):
        check_config(TrainConfig(data=["x"], out="", resize=16, crop=16))
    check_config(TrainConfig(data=["x"], out="", resize=40, crop=32))
