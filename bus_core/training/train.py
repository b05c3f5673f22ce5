"""Training: one readable script, `get_args_parser()` + `main(args)`, usable as a library.

A run writes into its output folder:

    <out>/model.safetensors, <out>/card.json   the best model (by the monitored val metric),
                                               temperature-calibrated, with val and test metrics
    <out>/train/progress.jsonl                 one JSON event per step and epoch (the app tails it)
    <out>/train/config.json                    the run's settings
    <out>/train/split.json                     the split it used (a copy, or the one it made)
    <out>/train/checkpoint.pt                  everything needed to resume (weights_only-safe)
    <out>/train/best.safetensors               the best weights so far
    (`runs.RunFiles` names these paths; every module finds them there.)

A run killed at any point resumes with `--resume` from its last checkpoint (written at every
epoch end and every `--checkpoint-every` seconds, atomically). Creating `<out>/train/CANCEL`
stops a run cleanly after the current step.

Under torchrun (`torchrun --nproc_per_node N -m bus_core train ...`, or `--nproc-per-node N`,
which starts torchrun itself) the run is data-parallel (DistributedDataParallel): see
`bus_core.runtime.distributed`. `--batch-size` is per process; rank 0 alone writes the files above.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from bus_core import atomic
from bus_core.constants import CLASSES
from bus_core.data.dataset import Record, load_many
from bus_core.data.inputs import INPUT_MODES, InputSpec, default_margin
from bus_core.data.loader import (
    BALANCE_MODES,
    PlanLoader,
    RecordDataset,
    class_weights,
    default_train_workers,
    epoch_plan,
    plan_batches,
    tissue_pool,
)
from bus_core.data.masks import COMBINE_MODES
from bus_core.data.presets import FITS, InputSize, input_size_for
from bus_core.data.splits import (
    Split,
    find_groups,
    load_split,
    make_split,
    save_split,
    split_records,
)
from bus_core.errors import BusError, DataError, ModelError, storage
from bus_core.evaluation.evaluate import collect_logits, evaluate
from bus_core.metrics import (
    HEADLINE_KEYS,
    LOWER_IS_BETTER,
    compute_metrics,
    fit_malignant_threshold,
    fit_temperature,
    nll,
    softmax,
    threshold_metrics,
)
from bus_core.models.build import MIN_INPUT_SIZE, LoadedModel, build_model, file_sha256, save_model
from bus_core.models.card import ARCHS, CARD_FILE, ModelCard, new_card, read_card
from bus_core.models.registry import two_stage_folders
from bus_core.runtime import distributed
from bus_core.runtime.device import (
    DEVICE_CHOICES,
    DeviceConfig,
    autocast,
    choose_device,
    needs_grad_scaler,
    prepare_model,
    to_device,
)
from bus_core.runtime.distributed import Ranks
from bus_core.training.averaging import (
    WeightAverage,
    add_shared_training_options,
    check_average_options,
)
from bus_core.training.mixstyle import MixStyle
from bus_core.training.runs import (
    EtaClock,
    ProgressLog,
    RunFiles,
    next_epoch_fits,
    read_progress,
    run_state,
)

log = logging.getLogger(__name__)

BACKGROUND_ENV = "BUS_BACKGROUND_JOB"
"""Set (to "1") in the environment of a run that `jobs` starts in the background."""

OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULERS: tuple[str, ...] = ("none", "cosine", "step", "plateau")


COMPILE_MODES: tuple[str, ...] = ("none", "default", "reduce-overhead", "max-autotune")
"""`--compile` choices: none (eager) or a `torch.compile` mode."""


@dataclass
class TrainConfig:
    """Every setting of a training run (saved as train/config.json)."""

    data: list[str]
    out: str
    arch: str = "densenet121"
    split: str | None = None
    extra_train: list[str] = field(default_factory=list)
    max_per_class: int | None = None
    input_mode: str = "full"
    combine_mode: str = "weighted"
    combine_threshold: float = 0.3
    init: str = "random"
    optimizer: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9
    batch_size: int = 16
    epochs: int = 10
    scheduler: str = "cosine"
    label_smoothing: float = 0.0
    balance: str = "augment"
    monitor: str = "macro_f1"
    patience: int = 0
    seed: int = 0
    device: str = "auto"
    resize: int | None = None
    crop: int | None = None
    fit: str = "crop"
    crop_margin: float | None = None
    tissue_share: float = 0.0
    checkpoint_every: float = 120.0
    save_dtype: str = "float16"
    name: str | None = None
    nproc_per_node: int = 1
    workers: int | None = None
    compile: str = "none"
    ultrasound_augment: float = 0.0
    style_augment: bool = False
    mixstyle: float = 0.0
    ema: float = 0.0
    ema_warmup: bool = False
    time_limit: float = 0.0

    @property
    def size(self) -> InputSize:
        """Preprocessing sizes: the architecture's standard, or the overrides."""
        std = input_size_for(self.arch)
        return InputSize(self.resize or std.resize, self.crop or std.crop, self.fit)

    @property
    def worker_count(self) -> int:
        """Processes that build training batches (`workers`, by default
        `default_train_workers()`; 0: the training process builds them)."""
        return default_train_workers() if self.workers is None else self.workers

    @property
    def margin(self) -> float:
        """The crop margin: `crop_margin`, or the input mode's default."""
        return default_margin(self.input_mode) if self.crop_margin is None else self.crop_margin

    @property
    def files(self) -> RunFiles:
        """The run's files (progress, checkpoint, split...)."""
        return RunFiles(Path(self.out))

    @property
    def run_dir(self) -> Path:
        """The folder of the run's progress, checkpoint and split."""
        return self.files.dir


@dataclass
class TrainResult:
    """Where the model went and how it did."""

    out: Path
    card: ModelCard | None
    status: str  # "done" | "cancelled"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The command-line options of `python -m bus_core train`."""
    p = argparse.ArgumentParser(description="Train a breast-ultrasound classifier.",
                                add_help=add_help)
    p.add_argument("--data", action="append",
                   help="BUSI-layout folder or CSV manifest (repeat to combine; not with --resume)")
    p.add_argument("--out", required=True, help="model folder to write, e.g. weights/my-model")
    p.add_argument("--arch", default="densenet121", choices=ARCHS)
    p.add_argument("--split", help="split JSON to use (default: make a group-disjoint 70/15/15)")
    p.add_argument("--extra-train", action="append", default=[],
                   help="data added to the training subset only (repeatable)")
    p.add_argument("--max-per-class", type=int, help="use at most N images per class (quick runs)")
    p.add_argument("--input-mode", default="full", choices=INPUT_MODES)
    p.add_argument("--combine-mode", default="weighted", choices=COMBINE_MODES)
    p.add_argument("--combine-threshold", type=float, default=0.3)
    p.add_argument("--init", default="random",
                   help="'random', 'imagenet' or the path of a checkpoint folder")
    p.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--momentum", type=float, default=0.9, help="SGD / RMSprop momentum")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--scheduler", default="cosine", choices=SCHEDULERS)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--balance", default="augment", choices=BALANCE_MODES,
                   help="augment: extra augmented copies of minority classes; weights: class-"
                        "weighted loss; sampler: weighted sampling; source-class: weighted "
                        "sampling that draws every (source, class) cell of several --data as "
                        "often; none")
    p.add_argument("--monitor", default="macro_f1",
                   help="validation metric for best-checkpoint keeping and early stopping "
                        "(loss, accuracy, macro_f1, balanced_accuracy, malignant_sensitivity, "
                        "auc_malignant, auc_macro_ovr)")
    p.add_argument("--patience", type=int, default=0,
                   help="stop after N epochs without improvement (0: never)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--resize", type=int, help="shorter side before cropping (default 256)")
    p.add_argument("--crop", type=int, help="input size (default 224; 299 for inception_v3)")
    p.add_argument("--fit", default="crop", choices=FITS,
                   help="crop: resize the shorter side, centre-crop (the seed preset); pad: the "
                        "whole image padded to a square")
    p.add_argument("--crop-margin", type=float,
                   help="mask input modes: the lesion box grows by this share of its size on "
                        "each side (default 0.5 for lesion-context, else 0.1)")
    p.add_argument("--tissue-share", type=float, default=0.0,
                   help="lesion-context mode: add this many lesion-free windows (label normal) "
                        "per training image, from data sets without normal images")
    p.add_argument("--checkpoint-every", type=float, default=120.0,
                   help="seconds between mid-epoch checkpoints")
    p.add_argument("--save-dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--name", help="model name in its card (default: the folder name)")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="train as N processes of this machine, one per GPU (starts torchrun; "
                        "ignored when already started by torchrun)")
    p.add_argument("--workers", type=int,
                   help="processes that crop and augment training batches ahead of the step "
                        f"(default here {default_train_workers()}: CPU cores - 1, at most 4; "
                        "0: none)")
    p.add_argument("--compile", default="none", choices=COMPILE_MODES,
                   help="torch.compile the network of the training step in this mode (none: "
                        "eager); compiling takes a minute or more once, then steps are faster, "
                        "mostly on GPUs; validation and the saved weights use the eager model")
    p.add_argument("--ultrasound-augment", type=float, default=0.0, metavar="STRENGTH",
                   help="also change gain, gamma, contrast, speckle, blur and resolution of "
                        "training inputs at this strength (1: as train-seg; 0: off)")
    add_shared_training_options(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint, with every setting "
                        "it was started with")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A TrainConfig from parsed command-line arguments (a new run: --data is needed)."""
    if not args.data:
        raise DataError("Give the training data with --data (a BUSI-layout folder or a CSV "
                        "manifest), or continue an earlier run with --resume --out FOLDER.")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def main(args: argparse.Namespace) -> TrainResult:
    """Run (or resume) the training described by command-line arguments."""
    resume = bool(getattr(args, "resume", False))
    config = load_config(args.out) if resume else config_from_args(args)
    if not os.environ.get(BACKGROUND_ENV):
        # A run started by hand drops a stale cancel request; a background job's was dropped
        # before it was launched, and one made while it loads must stop it.
        clear_cancel(config.files)
    if config.nproc_per_node > 1 and not distributed.launched():
        return _train_under_torchrun(config, resume)
    return train(config, resume=resume, progress_bar=True)


def _train_under_torchrun(config: TrainConfig, resume: bool) -> TrainResult:
    """Run the training as `config.nproc_per_node` processes of this machine (torchrun): this
    process prepares the run folder, and the processes continue the run it holds."""
    prepare_run_folder(config, resume)
    command = distributed.torchrun_command(
        config.nproc_per_node, ["bus_core", "train", "--resume", "--out", config.out])
    started = time.time()
    code = subprocess.run(command, env=dict(os.environ, **{BACKGROUND_ENV: "1"})).returncode
    state = run_state([e for e in read_progress(config.files.progress)
                       if e.get("time", 0) >= started])
    if state == "done":
        return TrainResult(Path(config.out), read_card(config.out), "done")
    if state == "cancelled":
        return TrainResult(Path(config.out), None, "cancelled")
    raise BusError(f"The training processes stopped without finishing (exit code {code}; "
                   f"their messages are above). Continue with --resume --out {config.out}.")


def clear_cancel(files: RunFiles) -> None:
    """Remove a request to cancel the run."""
    with storage(f"write the run folder {files.dir}"):
        files.cancel.unlink(missing_ok=True)


def load_config(out: str | Path) -> TrainConfig:
    """The saved config of the run in `out` (for resuming)."""
    path = RunFiles(Path(out)).config
    if not path.is_file():
        raise DataError(f"There is no run to resume in {out} (no train/config.json).")
    try:
        return TrainConfig(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as exc:
        raise DataError(f"The settings of the run in {out} cannot be read ({exc}).") from exc


def atomic_torch_save(obj: Any, path: Path) -> None:
    """`torch.save` that leaves the old file in place until the new one is whole."""
    with atomic.atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _limit_per_class(records: list[Record], n: int | None, seed: int) -> list[Record]:
    if not n:
        return records
    rng = np.random.default_rng(seed)
    kept: list[Record] = []
    for label in CLASSES:
        same = [r for r in records if r.label == label]
        kept += [same[i] for i in sorted(rng.permutation(len(same))[:n])]
    return sorted(kept, key=lambda r: r.id)


def check_config(config: TrainConfig) -> None:
    """Refuse settings that cannot work together (`DataError`) or an input size the
    architecture cannot take (`ModelError`), before anything starts."""
    if config.style_augment and config.ultrasound_augment <= 0:
        raise DataError("The scanner-style augmentation of this training is applied at the "
                        "ultrasound augmentation's strength: give --ultrasound-augment too "
                        "(e.g. 1).")
    check_average_options(config.ema, config.ema_warmup)
    if config.mixstyle > 0 and config.arch != "densenet121":
        raise ModelError(f"MixStyle mixes the outputs of DenseNet121's dense blocks; "
                         f"{config.arch} has none. Train a densenet121, or leave out --mixstyle.")
    if config.split and config.max_per_class:
        raise DataError("Using at most N images per class makes a new split from fewer images, "
                        "so it cannot be combined with a saved split file. Choose a new split, "
                        "or use all images.")
    smallest = MIN_INPUT_SIZE.get(config.arch, 0)
    if config.size.crop < smallest:
        raise ModelError(f"{config.arch} needs an input size of at least {smallest} px; "
                         f"{config.size.crop} px was asked for.")


def prepare_split(config: TrainConfig) -> tuple[Split, list[Record]]:
    """The split of the run (given, resumed, or made and saved) and the records it covers."""
    check_config(config)
    records = load_many(config.data)
    split_path = config.files.split
    if config.split:
        split = load_split(config.split)
        save_split(split, split_path)
        return split, records
    records = _limit_per_class(records, config.max_per_class, config.seed)
    if split_path.is_file():
        split = load_split(split_path)
    else:
        split = make_split(records, seed=config.seed, groups=find_groups(records))
    save_split(split, split_path)
    return split, records


def make_optimizer(config: TrainConfig, params: Any) -> torch.optim.Optimizer:
    """The optimiser named in `config`."""
    kind, lr, wd = config.optimizer, config.lr, config.weight_decay
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=wd,
                               nesterov=config.momentum > 0)
    if kind == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=config.momentum, weight_decay=wd)
    raise ValueError(f"Unknown optimizer {kind!r}; choose one of {', '.join(OPTIMIZERS)}.")


def make_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> Any:
    """The per-epoch learning-rate scheduler named in `config` (None for 'none')."""
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, config.epochs))
    if config.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, config.epochs // 3),
                                               gamma=0.1)
    if config.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min" if config.monitor in LOWER_IS_BETTER else "max", patience=2)
    return None


def score(metrics: dict[str, Any], monitor: str) -> float | None:
    """The monitored value oriented so that higher is better (None when it does not exist)."""
    value = metrics.get(monitor)
    if value is None:
        return None
    return -float(value) if monitor in LOWER_IS_BETTER else float(value)


def share_of(dataset: RecordDataset, ranks: Ranks) -> RecordDataset:
    """This rank's share of an evaluation set (items rank, rank + world_size, ...): the whole
    set in a single process."""
    if not ranks.distributed:
        return dataset
    return RecordDataset(dataset.records[ranks.rank::ranks.world_size], dataset.spec)


def validate(model: nn.Module, dataset: RecordDataset, device: DeviceConfig, batch_size: int,
             ranks: Ranks, share: RecordDataset) -> tuple[dict[str, Any], np.ndarray]:
    """Val metrics (with 'loss') and logits of `model` on `dataset`, of which this rank
    computes `share` (`share_of`); every rank gets the same figures."""
    logits = distributed.gather_rows(collect_logits(model, share, device, batch_size), ranks)
    y = np.asarray(dataset.labels)
    metrics = compute_metrics(y, softmax(logits))
    metrics["loss"] = nll(logits, y)
    return metrics, logits


class _Checkpoint:
    """The resumable state of a run, saved atomically as train/checkpoint.pt."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
             scaler: torch.amp.GradScaler, state: dict[str, Any], average: WeightAverage
             ) -> None:
        atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict() if scheduler else None,
                            "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(),
                            "state": state, "average": average.state_dict()}, self.path)

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        return torch.load(self.path, map_location="cpu", weights_only=True)


def _sync_memory_format(model: nn.Module, device: DeviceConfig) -> None:
    if device.channels_last:
        model.to(memory_format=torch.channels_last)


def prepare_run_folder(config: TrainConfig, resume: bool) -> None:
    """Create the run folder, drop what a killed write left (and, for a new run, the files of
    an earlier one) and save the run's settings."""
    files = config.files
    with storage(f"write the run folder {files.dir}"):
        files.dir.mkdir(parents=True, exist_ok=True)
        atomic.remove_partial_writes(files.dir)  # what a killed checkpoint write left behind
        if not resume:
            for stale in (files.progress, files.checkpoint, files.best):
                stale.unlink(missing_ok=True)
            if not config.split:
                files.split.unlink(missing_ok=True)
        atomic.write_text(files.config, json.dumps(dataclasses.asdict(config), indent=2))


def train(config: TrainConfig, *, resume: bool = False, progress_bar: bool = False,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train, validate every epoch, keep the best model, calibrate it and test it once.

    Returns when done or cancelled (CANCEL file, even one made before the run started, or
    `should_stop()`); a cancelled or killed run can be resumed with `resume=True`. Under
    torchrun, this process is one rank of a data-parallel run (`bus_core.runtime.distributed`).
    """
    files = config.files
    ranks = Ranks.from_env()
    if ranks.is_main:
        prepare_run_folder(config, resume)
    log = ProgressLog(files.progress, enabled=ranks.is_main)
    try:
        with storage(f"write the run folder {files.dir}"), \
                distributed.process_group(ranks, choose_device(config.device)) as device:
            return _train(config, device, ranks, resume, log, progress_bar, should_stop)
    except Exception as exc:
        with contextlib.suppress(OSError):  # the folder may be what failed
            fields = {"rank": ranks.rank} if ranks.distributed else {}
            ProgressLog(files.progress).write("error", message=str(exc),
                                              kind=exc.__class__.__name__, **fields)
        raise


def _train(config: TrainConfig, device: DeviceConfig, ranks: Ranks, resume: bool,
           log: ProgressLog, progress_bar: bool, should_stop: Callable[[], bool] | None
           ) -> TrainResult:
    torch.manual_seed(config.seed)
    split, records = distributed.broadcast(prepare_split(config) if ranks.is_main else None,
                                           ranks)
    spec = InputSpec.of(config.input_mode, config.combine_mode, config.combine_threshold,
                        config.margin, config.size)
    train_records = split_records(records, split, "train") + load_many(config.extra_train)
    train_ds = RecordDataset(train_records, spec, train=True,
                             ultrasound=config.ultrasound_augment, style=config.style_augment)
    val_ds = RecordDataset(split_records(records, split, "val"), spec)
    test_ds = RecordDataset(split_records(records, split, "test"), spec)
    if len(train_ds) < 2 or len(val_ds) == 0:
        raise DataError(f"Too few images to train: {len(train_ds)} for training and "
                        f"{len(val_ds)} for validation. Add data or use a larger split.")
    val_share = share_of(val_ds, ranks)

    model = prepare_model(build_model(config.arch, len(CLASSES), config.init), device)
    optimizer = make_optimizer(config, model.parameters())
    scheduler = make_scheduler(config, optimizer)
    scaler = torch.amp.GradScaler(device.device.type, enabled=needs_grad_scaler(device))
    average = WeightAverage(model, config.ema, config.ema_warmup)
    mixing = MixStyle(config.mixstyle) if config.mixstyle > 0 else None
    if mixing:  # after the average, whose copy of the network is never mixed
        mixing.attach(model.get_submodule("features"))
    weights = class_weights(train_ds.labels) if config.balance == "weights" else None
    criterion = nn.CrossEntropyLoss(weight=weights.to(device.device) if weights is not None
                                    else None, label_smoothing=config.label_smoothing)
    checkpoint = _Checkpoint(config.files.checkpoint)
    state: dict[str, Any] = {"epoch": 0, "step": 0, "best": None, "best_epoch": None,
                             "bad_epochs": 0, "train_time_s": 0.0, "history": []}
    state["n_train"] = len(train_ds)
    saved = checkpoint.load() if resume else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        _sync_memory_format(model, device)
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler and saved["scheduler"]:
            scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        average.load_state_dict(saved.get("average"))
        torch.set_rng_state(saved["torch_rng"])
        state = saved["state"] | {"n_train": len(train_ds)}
    if state.get("world_size", ranks.world_size) != ranks.world_size:
        state["step"] = 0  # steps count shards of this many processes: redo the epoch
    state["world_size"] = ranks.world_size
    if not ranks.is_main:  # rank 0 restored its random state; the others draw their own
        torch.manual_seed(distributed.rank_seed(config.seed, ranks, state["epoch"],
                                                state["step"]))
    net: nn.Module = model
    if ranks.distributed:
        net = DistributedDataParallel(
            model, device_ids=[device.device.index] if device.device.type == "cuda" else None)
    if config.compile != "none":
        net = cast(nn.Module, torch.compile(net, mode=config.compile))
    log.write("start", resumed=saved is not None, epoch=state["epoch"], step=state["step"],
              device=device.to_dict(), n_train=len(train_ds), n_val=len(val_ds),
              n_test=len(test_ds), config=dataclasses.asdict(config),
              split_data_hash=split.data_hash, world_size=ranks.world_size)

    pool = tissue_pool(train_ds) if config.tissue_share > 0 and \
        config.input_mode == "lesion-context" else []
    pipeline = PlanLoader(train_ds, workers=config.worker_count,
                          pin_memory=device.device.type == "cuda")
    last_save = time.monotonic()
    clock = EtaClock(n_val=len(val_ds), n_final=len(val_ds) + len(test_ds))
    global_batch = config.batch_size * ranks.world_size
    while state["epoch"] < config.epochs:
        epoch = state["epoch"]
        plan = epoch_plan(train_ds.labels, config.balance, epoch, config.seed,
                          tissue_pool=pool, tissue_share=config.tissue_share,
                          sources=train_ds.source_ids)
        mine = distributed.shard(plan, ranks)
        steps = math.ceil(len(mine) / config.batch_size)
        net.train()
        epoch_start = time_mark = time.monotonic()
        seen = correct = 0
        loss_sum = 0.0
        bar = tqdm(total=steps, initial=state["step"], desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not (progress_bar and ranks.is_main), unit="step")
        batches = plan_batches(mine, config.batch_size, seed=config.seed, epoch=epoch,
                               rank=ranks.rank, start=state["step"])
        items_of = {batch.step: batch.items for batch in batches}
        step_start = time.monotonic()
        for step, images, labels in pipeline.epoch(batches):
            if mixing:
                mixing.domains = torch.tensor([train_ds.source_ids[it.index]
                                               for it in items_of[step]])
            images = to_device(images, device)
            labels = labels.to(device.device, non_blocking=True)
            logits, loss = train_step(net, images, labels, optimizer, scaler, criterion, device)
            average.update()
            asked = ranks.is_main and ((should_stop and should_stop())
                                       or config.files.cancel.exists())
            n, right, losses, stops = distributed.sum_over_ranks(
                [len(labels), int((logits.argmax(1) == labels).sum()), loss.item() * len(labels),
                 float(asked)], ranks, device.device)
            stop = stops > 0
            seen += int(n)
            correct += int(right)
            loss_sum += losses
            elapsed = time.monotonic() - epoch_start
            rate = seen / max(elapsed, 1e-9)
            clock.trained(int(n), time.monotonic() - step_start)
            remaining = (steps - step - 1) * global_batch + \
                (config.epochs - epoch - 1) * len(plan)
            state["step"] = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            log.write("step", epoch=epoch + 1, epochs=config.epochs, step=step + 1, steps=steps,
                      loss=losses / n, mean_loss=loss_sum / seen, accuracy=correct / seen,
                      lr=optimizer.param_groups[0]["lr"], images_per_s=rate,
                      eta_s=clock.eta(remaining, config.epochs - epoch))
            if ranks.is_main and (stop or time.monotonic() - last_save > config.checkpoint_every):
                state["train_time_s"] += time.monotonic() - time_mark
                checkpoint.save(model, optimizer, scheduler, scaler, state, average)
                time_mark = last_save = time.monotonic()
            if stop:
                bar.close()
                log.write("cancelled", epoch=epoch + 1, step=step + 1)
                return TrainResult(Path(config.out), None, "cancelled")
            step_start = time.monotonic()
        bar.close()
        val_start = time.monotonic()
        distributed.share_buffers(model, ranks)
        val_metrics, _ = validate(average.module, val_ds, device, config.batch_size, ranks,
                                  val_share)
        clock.evaluated(len(val_ds), time.monotonic() - val_start)
        value = score(val_metrics, config.monitor)
        improved = value is not None and (state["best"] is None or value > state["best"])
        if improved:
            state.update(best=value, best_epoch=epoch + 1, bad_epochs=0)
            if ranks.is_main:
                save_weights(average.module, config.files.best)
        else:
            state["bad_epochs"] += 1
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(val_metrics["loss"] if config.monitor in LOWER_IS_BETTER
                           else (val_metrics.get(config.monitor) or 0.0))
        elif scheduler:
            scheduler.step()
        summary = {k: val_metrics.get(k) for k in ("loss", *HEADLINE_KEYS)}
        state["train_time_s"] += time.monotonic() - time_mark
        state["history"].append({"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1),
                                 "train_accuracy": correct / max(seen, 1), "val": summary})
        state.update(epoch=epoch + 1, step=0)
        if ranks.is_main:
            checkpoint.save(model, optimizer, scheduler, scaler, state, average)
        last_save = time.monotonic()
        log.write("epoch", epoch=epoch + 1, epochs=config.epochs,
                  train_loss=loss_sum / max(seen, 1), train_accuracy=correct / max(seen, 1),
                  val=summary, monitor=config.monitor, improved=improved,
                  best_epoch=state["best_epoch"], train_time_s=state["train_time_s"])
        if config.patience and state["bad_epochs"] >= config.patience:
            log.write("early_stop", epoch=epoch + 1, best_epoch=state["best_epoch"])
            break
        if state["epoch"] < config.epochs and not next_epoch_fits(
                config.time_limit, state["train_time_s"], state["epoch"]):
            log.write("time_limit", epoch=epoch + 1, best_epoch=state["best_epoch"])
            break

    if not ranks.is_main:  # rank 0 calibrates, tests and saves the model
        return TrainResult(Path(config.out), None, "done")
    card = _finish(config, model, device, val_ds, test_ds, split, state)
    log.write("done", out=str(config.out), best_epoch=state["best_epoch"],
              test=card.metrics.get("test"), val=card.metrics.get("val"),
              train_time_s=state["train_time_s"])
    return TrainResult(Path(config.out), card, "done")


def train_step(net: nn.Module, images: torch.Tensor, labels: torch.Tensor,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               criterion: nn.Module, device: DeviceConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch already on the device (`device.to_device`), under
    `device`'s autocast; returns the batch's logits and loss."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(device):
        logits = net(images)
        loss = criterion(logits.float(), labels)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return logits, loss


def save_weights(model: nn.Module, path: Path) -> None:
    """A model's state dict as a safetensors file, written atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic.atomic_path(path) as tmp:
        save_file(state, str(tmp))


@torch.no_grad()
def round_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every floating-point parameter and buffer to `dtype` (kept in its own dtype)."""
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            tensor.copy_(tensor.to(dtype))


def _subset_metrics(model: nn.Module, dataset: RecordDataset, device: DeviceConfig,
                    batch_size: int, temperature: float, threshold: float | None,
                    description: dict[str, Any]) -> dict[str, Any]:
    logits = collect_logits(model, dataset, device, batch_size)
    y, probs = np.asarray(dataset.labels), softmax(logits, temperature)
    metrics = compute_metrics(y, probs)
    if threshold is not None:
        metrics["at_threshold"] = threshold_metrics(y, probs, threshold)
    metrics["temperature"] = temperature
    metrics["data"] = description
    return metrics


def _finish(config: TrainConfig, model: nn.Module, device: DeviceConfig,
            val_ds: RecordDataset, test_ds: RecordDataset, split: Split,
            state: dict[str, Any]) -> ModelCard:
    """Reload the best weights, fit the temperature on val, test once, save model + card.

    The weights are first rounded to the saved dtype, so the card's figures describe the very
    weights that are saved.
    """
    best = config.files.best
    if best.is_file():
        model.load_state_dict(load_file(best))
        _sync_memory_format(model, device)
    dtype = torch.float16 if config.save_dtype == "float16" else torch.float32
    round_weights(model, dtype)
    val_logits = collect_logits(model, val_ds, device, config.batch_size)
    temperature = fit_temperature(val_logits, np.asarray(val_ds.labels))
    threshold = fit_malignant_threshold(val_ds.labels, softmax(val_logits, temperature))
    split_file = config.split or str(config.files.split)
    metrics = {}
    for subset, dataset in (("val", val_ds), ("test", test_ds)):
        if len(dataset):
            metrics[subset] = _subset_metrics(
                model, dataset, device, config.batch_size, temperature, threshold,
                {"subset": subset, "split_file": split_file, "data_hash": split.data_hash,
                 "sources": config.data, "n": len(dataset)})
    hyper = {k: getattr(config, k) for k in ("optimizer", "lr", "weight_decay", "batch_size",
                                             "epochs", "scheduler", "balance", "monitor",
                                             "patience", "seed", "label_smoothing",
                                             "ultrasound_augment", "style_augment",
                                             "mixstyle", "ema", "ema_warmup",
                                             "time_limit")}
    hyper["epochs_trained"] = len(state["history"])
    hyper["best_epoch"] = state["best_epoch"]
    world = state["world_size"]
    hyper |= {"world_size": world, "global_batch_size": config.batch_size * world}
    metrics["history"] = state["history"]
    card = new_card(
        config.name or Path(config.out).name, config.arch,
        input_size=dataclasses.asdict(config.size), input_mode=config.input_mode,
        combine_mode=config.combine_mode, combine_threshold=config.combine_threshold,
        crop_margin=config.margin, temperature=temperature,
        malignant_threshold=threshold, init=config.init,
        training_data={"sources": config.data, "extra_train": config.extra_train,
                       "n_train": state.get("n_train"), "max_per_class": config.max_per_class},
        split={"file": split_file, "file_sha256": file_sha256(Path(split_file)),
               "data_hash": split.data_hash, "seed": split.seed, "ratios": list(split.ratios)},
        hyperparameters=hyper, metrics=metrics, training_time_s=round(state["train_time_s"], 1),
        notes=f"Trained on {f'{world} × ' if world > 1 else ''}{device.description}.")
    model_cpu = build_model(config.arch, len(CLASSES))
    model_cpu.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    save_model(model_cpu, card, config.out, dtype=dtype)
    pair = _inherited_pair(config)
    if pair and len(val_ds):
        card = _as_two_stage(LoadedModel(model_cpu.eval(), card, Path(config.out)), pair,
                             device, config.batch_size, val_ds, test_ds)
        save_model(model_cpu, card, config.out, dtype=dtype)
    return card


def _inherited_pair(config: TrainConfig) -> dict[str, str]:
    """The `two_stage` pair of the model this one starts from (`config.init`), kept when the
    new model reads the same input and the pair is found from its folder; else none."""
    init = Path(config.init)
    if not (init / CARD_FILE).is_file():
        return {}
    source = read_card(init)
    if not source.two_stage or source.input_mode != config.input_mode:
        return {}
    try:
        two_stage_folders(Path(config.out), source)
    except ModelError as exc:
        log.warning("The new model reads alone: %s", exc)
        return {}
    return dict(source.two_stage)


def _as_two_stage(loaded: LoadedModel, pair: dict[str, str], device: DeviceConfig,
                  batch_size: int, val_ds: RecordDataset, test_ds: RecordDataset) -> ModelCard:
    """The card of the lesion model `loaded` read in two stages with `pair`: val and test
    figures of that reading (on the data's lesion masks), its threshold fitted on val; the
    lesion model's own figures kept under `lesion_model_alone`."""
    card = dataclasses.replace(loaded.card, two_stage=pair)
    loaded = dataclasses.replace(loaded, card=card)
    metrics = dict(card.metrics)
    metrics["lesion_model_alone"] = {
        **{k: metrics[k] for k in ("val", "test") if k in metrics},
        "malignant_threshold": card.malignant_threshold}
    results = {subset: evaluate(loaded, dataset.records, device=device, batch_size=batch_size,
                                data=metrics[subset]["data"], backend="torch")
               for subset, dataset in (("val", val_ds), ("test", test_ds)) if len(dataset)}
    threshold = fit_malignant_threshold(results["val"].y_true, results["val"].probs)
    for subset, result in results.items():
        if threshold is not None:
            result.metrics["at_threshold"] = threshold_metrics(result.y_true, result.probs,
                                                               threshold)
        metrics[subset] = result.metrics
    return dataclasses.replace(card, malignant_threshold=threshold, metrics=metrics)


def run(argv: Sequence[str] | None = None) -> TrainResult:
    """Parse `argv` and train (the `python -m bus_core.training.train` entry point)."""
    return main(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    run()
