"""Architecture comparison: a published three-network table on BUSI, re-run on one split.

`python -m bus_core compare --data BUSI --split splits/busi.json --out runs/compare` trains one
model per row (default: DenseNet121, VGG16, ResNet50, InceptionV3 with AdamW and with RMSprop)
with the same split, initialisation policy, class-weighted loss, epoch budget and input size,
keeps each row's best validation epoch (`--monitor`, as `train`), and scores it once on the
test subset. The comparison folder holds:

    <out>/<row>/                 the row's model folder (a `train` run: card, train/ files)
    <out>/<row>/compare-row.json the row's figures, written when the row is finished
    <out>/results.csv            one line per finished row (ROW_COLUMNS)
    <out>/results.md             the same as a Markdown table, with the settings
    <out>/compare.json           settings, rows and each row's malignant ROC curve on test
                                 (the Evaluate page reads it)

The table is rewritten after every row. A killed comparison resumes when started again with
the same settings: finished rows are skipped, an unfinished row continues from its checkpoint
(train's resume), and a row trained with other settings is refused rather than mixed in.

Sensitivity first: besides the argmax figures, each row has the malignant threshold chosen on
validation for sensitivity >= `TARGET_SENSITIVITY` (`metrics.fit_malignant_threshold`) and the
test sensitivity and specificity of the rule "P(malignant) >= threshold". Inference time is the
median PyTorch forward pass of one image on the comparison's device (no OpenVINO, so every
architecture runs through the same path).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bus_core import atomic
from bus_core.constants import MALIGNANT
from bus_core.data.dataset import Record, load_many
from bus_core.data.loader import BALANCE_MODES
from bus_core.data.splits import Split, load_split, split_records
from bus_core.errors import CompareError, storage
from bus_core.evaluation.evaluate import Evaluation, evaluate
from bus_core.metrics import (
    TARGET_SENSITIVITY,
    fit_malignant_threshold,
    fmt3,
    nll,
    roc_curves,
    threshold_metrics,
)
from bus_core.models.build import imagenet_cached, load_model
from bus_core.models.card import ARCHS, CARD_FILE
from bus_core.runtime.backends import TorchForward
from bus_core.runtime.device import DEVICE_CHOICES, DeviceConfig, choose_device, prepare_model
from bus_core.settings import PROJECT_ROOT, data_dir
from bus_core.training.runs import read_progress
from bus_core.training.train import OPTIMIZERS, TrainConfig, clear_cancel, train

DEFAULT_ROWS: tuple[str, ...] = ("densenet121", "vgg16", "resnet50", "inception_v3:adamw",
                                 "inception_v3:rmsprop")
"""The rows of the published comparison (and DenseNet121, this project's model)."""
INCEPTION_MIN_CROP = 75
"""torchvision's InceptionV3 refuses inputs smaller than this (px)."""
ROW_FILE = "compare-row.json"
RESULTS_FILE = "compare.json"
TIMING_RUNS = 20
"""Forward passes timed per row for the inference figure (after two warm-up passes)."""
SETTINGS_THAT_MATTER: tuple[str, ...] = (
    "data", "split", "arch", "optimizer", "init", "lr", "weight_decay", "batch_size", "epochs",
    "scheduler", "balance", "monitor", "seed", "resize", "crop", "input_mode")
"""TrainConfig fields that must be equal for a finished or half-trained row to be reused."""

ROW_COLUMNS: tuple[str, ...] = (
    "row", "arch", "optimizer", "init", "epochs", "best_epoch", "input_px",
    "malignant_sensitivity", "sensitivity_at_threshold", "specificity_at_threshold",
    "threshold", "accuracy", "malignant_specificity", "macro_f1", "auc_malignant", "ece",
    "test_loss", "training_time_s", "device", "parameters", "inference_ms", "n_test", "model")
"""The columns of results.csv, in order (figures on the test subset)."""
COLUMN_TITLES: dict[str, str] = {
    "row": "row", "arch": "architecture", "optimizer": "optimiser", "init": "initialisation",
    "epochs": "epochs", "best_epoch": "best val epoch", "input_px": "input (resize / crop px)",
    "accuracy": "accuracy", "test_loss": "test loss", "malignant_sensitivity":
    "malignant sensitivity", "malignant_specificity": "malignant specificity",
    "macro_f1": "macro-F1", "auc_malignant": "AUC malignant", "ece": "ECE",
    "threshold": f"threshold (val, sens >= {TARGET_SENSITIVITY:.2f})",
    "sensitivity_at_threshold": "sensitivity at threshold",
    "specificity_at_threshold": "specificity at threshold", "training_time_s": "training s",
    "device": "device", "parameters": "parameters", "inference_ms": "inference ms / image",
    "n_test": "test images", "model": "model folder"}
"""Human column names (results.md and the Evaluate page)."""


@dataclass(frozen=True)
class Row:
    """One row of the comparison: an architecture and its optimiser."""

    arch: str
    optimizer: str

    @property
    def name(self) -> str:
        """The row's folder and table name, e.g. 'vgg16-adam' or 'inception_v3-rmsprop'."""
        return f"{self.arch}-{self.optimizer}"


def parse_rows(specs: Sequence[str], default_optimizer: str) -> list[Row]:
    """Rows from 'ARCH' or 'ARCH:OPTIMIZER' strings (CompareError for unknown names or a row
    given twice)."""
    rows = []
    for spec in specs:
        arch, _, optimizer = spec.strip().lower().partition(":")
        optimizer = optimizer or default_optimizer
        if arch not in ARCHS or optimizer not in OPTIMIZERS:
            raise CompareError(f"{spec!r} is not a comparison row: write ARCH or "
                               f"ARCH:OPTIMIZER with ARCH one of {', '.join(ARCHS)} and "
                               f"OPTIMIZER one of {', '.join(OPTIMIZERS)}.")
        row = Row(arch, optimizer)
        if row in rows:
            raise CompareError(f"The row {row.name} is given twice.")
        rows.append(row)
    return rows


def init_for(arch: str, policies: Sequence[str]) -> str:
    """The initialisation of `arch` under `--init` values: 'ARCH=FOLDER' for that architecture,
    else the one plain policy given ('random' or 'imagenet'; default 'random')."""
    plain = [p for p in policies if "=" not in p]
    own = [p.split("=", 1)[1] for p in policies if p.split("=", 1)[0] == arch and "=" in p]
    if len(plain) > 1 or len(own) > 1:
        raise CompareError("Give one --init policy ('random' or 'imagenet') and at most one "
                           "--init ARCH=FOLDER per architecture.")
    return own[0] if own else plain[0] if plain else "random"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The command-line options of `python -m bus_core compare`."""
    p = argparse.ArgumentParser(description="Train and compare architectures on one split, "
                                            "sensitivity first.", add_help=add_help)
    p.add_argument("--data", action="append", required=True,
                   help="BUSI-layout folder or CSV manifest (repeat to combine)")
    p.add_argument("--split", required=True, help="split JSON every row uses")
    p.add_argument("--out", required=True, help="comparison folder, e.g. runs/compare")
    p.add_argument("--archs", nargs="+", default=list(DEFAULT_ROWS), metavar="ARCH[:OPT]",
                   help=f"rows, each an architecture ({', '.join(ARCHS)}) with an optional "
                        f"optimiser (default: {' '.join(DEFAULT_ROWS)})")
    p.add_argument("--optimizer", default="adam", choices=OPTIMIZERS,
                   help="optimiser of rows that name none")
    p.add_argument("--init", action="append", default=[],
                   help="'random' (default) or 'imagenet' for every row, and/or ARCH=FOLDER: "
                        "start that architecture from a checkpoint (repeatable)")
    p.add_argument("--epochs", type=int, default=10, help="epoch budget of every row")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--balance", default="weights", choices=BALANCE_MODES,
                   help="class balance (default: class-weighted loss, as published)")
    p.add_argument("--monitor", default="macro_f1",
                   help="validation metric that picks each row's best epoch")
    p.add_argument("--resize", type=int,
                   help="shorter side before cropping, every row (default: each "
                        "architecture's standard)")
    p.add_argument("--crop", type=int, help="input size, every row (default: 224, InceptionV3 "
                                            f"299; InceptionV3 needs >= {INCEPTION_MIN_CROP})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    return p


def row_configs(args: argparse.Namespace) -> list[TrainConfig]:
    """The training settings of every row of the comparison `args` describe (checked)."""
    rows = parse_rows(args.archs, args.optimizer)
    if args.crop is not None and args.crop < INCEPTION_MIN_CROP and \
            any(r.arch == "inception_v3" for r in rows):
        raise CompareError(f"InceptionV3 needs inputs of at least {INCEPTION_MIN_CROP} px; "
                           f"--crop {args.crop} is smaller. Every row gets the same input size, "
                           "so raise --crop or leave InceptionV3 out.")
    if args.epochs < 1:
        raise CompareError("The epoch budget (--epochs) must be at least 1.")
    configs = []
    for row in rows:
        init = init_for(row.arch, args.init)
        if init == "imagenet" and not imagenet_cached(row.arch):
            raise CompareError(f"There are no ImageNet weights for {row.arch} in the torch hub "
                               "cache of this machine, so this comparison cannot start them all "
                               "alike. Use --init random, or fetch the weights first.")
        configs.append(TrainConfig(
            data=list(args.data), out=str(Path(args.out) / row.name), arch=row.arch,
            split=args.split, init=init, optimizer=row.optimizer, lr=args.lr,
            weight_decay=args.weight_decay, batch_size=args.batch_size, epochs=args.epochs,
            balance=args.balance, monitor=args.monitor, seed=args.seed, device=args.device,
            resize=args.resize, crop=args.crop, name=row.name))
    return configs


def check_reusable(config: TrainConfig) -> None:
    """Refuse (CompareError) a row folder that holds a run with other settings than `config`."""
    saved_path = config.files.config
    if not saved_path.is_file():
        return
    try:
        saved = json.loads(saved_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CompareError(f"The settings of {config.out} cannot be read ({exc}); delete that "
                           "folder to train the row again.") from exc
    wanted = dataclasses.asdict(config)
    differ = [k for k in SETTINGS_THAT_MATTER if saved.get(k) != wanted[k]]
    if differ:
        shown = ", ".join(f"{k} {saved.get(k)!r} there, {wanted[k]!r} now" for k in differ)
        raise CompareError(f"{config.out} was trained with other settings ({shown}). Give "
                           "another --out, or delete that folder to train the row again.")


def parameter_count(model: torch.nn.Module) -> int:
    """The number of parameters of `model`."""
    return sum(p.numel() for p in model.parameters())


def inference_ms(model: torch.nn.Module, device: DeviceConfig, crop: int,
                 runs: int = TIMING_RUNS) -> float:
    """Median milliseconds of one PyTorch forward pass of one `crop`-px image on `device`."""
    forward = TorchForward(prepare_model(model, device), device)
    model.eval()
    image = torch.zeros(1, 3, crop, crop)
    times = []
    for i in range(runs + 2):
        start = time.perf_counter()
        forward(image)  # returns numpy: the device has finished
        if i >= 2:
            times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def _devices(config: TrainConfig) -> str:
    """The devices the row trained on, from its progress 'start' events ('a + b' if resumed
    elsewhere)."""
    seen: list[str] = []
    for event in read_progress(config.files.progress):
        description = (event.get("device") or {}).get("description")
        if event.get("event") == "start" and description and description not in seen:
            seen.append(description)
    return " + ".join(seen) or "unknown"


def score_row(config: TrainConfig, records: list[Record], split: Split,
              device: DeviceConfig) -> dict[str, Any]:
    """The figures of a trained row (ROW_COLUMNS, plus its malignant ROC on test as 'roc')."""
    loaded = load_model(config.out)
    card = loaded.card
    data = {"sources": config.data, "split_file": config.split, "data_hash": split.data_hash}
    runs: dict[str, Evaluation] = {}
    for subset in ("val", "test"):
        chosen = split_records(records, split, subset)
        runs[subset] = evaluate(loaded, chosen, device=device, batch_size=config.batch_size,
                                data={**data, "subset": subset, "n": len(chosen)},
                                backend="torch")
    val, test = runs["val"], runs["test"]
    m = test.metrics
    threshold = fit_malignant_threshold(val.y_true, val.probs, val.classes,
                                        target_sensitivity=TARGET_SENSITIVITY)
    at = threshold_metrics(test.y_true, test.probs, threshold, test.classes) \
        if threshold is not None and len(test.y_true) else {}
    curve = roc_curves(test.y_true, test.probs, test.classes).get(MALIGNANT)
    size = config.size
    row = {
        "row": Path(config.out).name, "arch": config.arch, "optimizer": config.optimizer,
        "init": config.init, "epochs": config.epochs,
        "best_epoch": (card.hyperparameters or {}).get("best_epoch"),
        "input_px": f"{size.resize} / {size.crop}", "accuracy": m.get("accuracy"),
        "test_loss": nll(test.logits, test.y_true) if len(test.y_true) else None,
        "malignant_sensitivity": m.get("malignant_sensitivity"),
        "malignant_specificity": m.get("malignant_specificity"), "macro_f1": m.get("macro_f1"),
        "auc_malignant": m.get("auc_malignant"), "ece": m.get("ece"), "threshold": threshold,
        "sensitivity_at_threshold": at.get("sensitivity"),
        "specificity_at_threshold": at.get("specificity"),
        "training_time_s": card.training_time_s, "device": _devices(config),
        "parameters": parameter_count(loaded.model),
        "inference_ms": inference_ms(loaded.model, device, size.crop), "n_test": m.get("n"),
        "model": config.out,
    }
    return {**row, "roc": curve}


def display_value(key: str, value: Any) -> str:
    """One cell of the results table for people: figures with 3 decimals, seconds whole,
    milliseconds with one decimal, parameters with thousands separators, '–' when missing."""
    if value is None:
        return "–"
    if key == "training_time_s":
        return f"{float(value):.0f}"
    if key == "inference_ms":
        return f"{float(value):.1f}"
    if key == "parameters":
        return f"{int(value):,}"
    return fmt3(value) if isinstance(value, float) else str(value)


DISPLAY_COLUMNS: tuple[str, ...] = (
    "row", "malignant_sensitivity", "sensitivity_at_threshold", "specificity_at_threshold",
    "threshold", "accuracy", "malignant_specificity", "macro_f1", "auc_malignant", "ece",
    "test_loss", "init", "epochs", "best_epoch", "input_px", "training_time_s", "device",
    "parameters", "inference_ms", "n_test")
"""The columns shown to people, sensitivity first (the row name says the architecture and
optimiser)."""


def markdown_table(rows: Sequence[dict[str, Any]], settings: dict[str, Any]) -> str:
    """results.md: the settings, then one table line per row (DISPLAY_COLUMNS)."""
    lines = ["# Architecture comparison", "",
             "Settings: " + ", ".join(f"{k} {v}" for k, v in settings.items()), "",
             "Figures on the test subset; the threshold is chosen on validation.", "",
             "| " + " | ".join(COLUMN_TITLES[k] for k in DISPLAY_COLUMNS) + " |",
             "|" + " --- |" * len(DISPLAY_COLUMNS)]
    lines += ["| " + " | ".join(display_value(k, row.get(k)).replace("|", "\\|")
                                for k in DISPLAY_COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(out: Path, rows: Sequence[dict[str, Any]], settings: dict[str, Any]) -> None:
    """results.csv, results.md and compare.json (with the ROC curves) in `out`."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(ROW_COLUMNS), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    with storage(f"write the comparison results in {out}"):
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_text(out / "results.csv", text.getvalue())
        atomic.write_text(out / "results.md", markdown_table(rows, settings))
        atomic.write_text(out / RESULTS_FILE, json.dumps(
            {"settings": settings, "rows": list(rows)}, indent=2, allow_nan=False))


def read_results(folder: str | Path) -> dict[str, Any]:
    """A comparison folder's compare.json: {"settings", "rows"} (CompareError if unreadable)."""
    path = Path(folder) / RESULTS_FILE
    try:
        content = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CompareError(f"The comparison results in {Path(folder).name} cannot be read "
                           f"({exc.__class__.__name__}).") from exc
    if not isinstance(content, dict) or not isinstance(content.get("rows"), list):
        raise CompareError(f"{path.name} in {Path(folder).name} is not a comparison's results.")
    return content


def find_comparisons() -> list[Path]:
    """Comparison folders (with a compare.json) under the project's runs/ and the data
    folder's runs/, newest first."""
    found = [p.parent for root in (PROJECT_ROOT / "runs", data_dir() / "runs")
             for p in root.glob(f"*/{RESULTS_FILE}")]
    return sorted(found, key=lambda p: (p / RESULTS_FILE).stat().st_mtime, reverse=True)


def compare(configs: Sequence[TrainConfig], out: str | Path, *,
            on_row: Callable[[dict[str, Any]], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> list[dict[str, Any]] | None:
    """Train and score every row (skipping finished ones, resuming a half-trained one) and
    rewrite the results after each; returns the rows, or None when stopped before the end."""
    out = Path(out)
    if not configs:
        raise CompareError("There are no rows to compare.")
    first = configs[0]
    settings = {k: getattr(first, k) for k in ("data", "split", "epochs", "batch_size", "lr",
                                               "balance", "monitor", "seed")}
    settings["target_sensitivity"] = TARGET_SENSITIVITY
    split = load_split(first.split or "")
    records = load_many(first.data)
    device = choose_device(first.device)
    for config in configs:
        check_reusable(config)
    rows: list[dict[str, Any]] = []
    for config in configs:
        row_file = Path(config.out) / ROW_FILE
        if row_file.is_file():
            row = json.loads(row_file.read_text())
        else:
            if not (Path(config.out) / CARD_FILE).is_file():
                clear_cancel(config.files)  # a stale request from an earlier comparison
                result = train(config, resume=config.files.checkpoint.is_file(),
                               should_stop=should_stop)
                if result.status != "done":
                    return None
            row = score_row(config, records, split, device)
            with storage(f"write {row_file}"):
                atomic.write_text(row_file, json.dumps(row, indent=2, allow_nan=False))
        rows.append(row)
        write_results(out, rows, settings)
        if on_row:
            on_row(row)
    return rows


def main(args: argparse.Namespace, on_row: Callable[[dict[str, Any]], None] | None = None
         ) -> list[dict[str, Any]] | None:
    """Run (or resume) the comparison described by command-line arguments; `on_row` is called
    with each row's figures as it is finished (or found finished)."""
    return compare(row_configs(args), args.out, on_row=on_row)

