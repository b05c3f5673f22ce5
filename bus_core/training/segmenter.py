"""Training of the lesion segmenter, optionally together with a classifier on the same encoder
(multi-task): `python -m bus_core train-seg`.

Data: one or more sources (a BUSI-layout folder, a CSV manifest such as BUS-BRA's labels.csv),
each with its committed split file (`--data A --split SA --data B --split SB`); only their
train subsets are trained on, val chooses the epoch and the post-processing, test is read once
at the end. Every image is decoded once and kept padded to a square (`presets.fit_square`).
An epoch draws `--epoch-size` items, each source equally often; a share `--normal-crops` of the
draws from a source without normal images becomes a lesion-free window of one of its images
(away from the mask) labelled normal with an empty mask, so "no lesion" is not learned as
"looks like BUSI".

Loss: binary cross-entropy + soft Dice on the lesion map; with `--cls-weight` > 0, plus that
weight times class-weighted cross-entropy of the class head.

A run writes into `--out`:

    <out>/segmenter/        the segmentation model (safetensors + card, task "segmentation")
    <out>/classifier/       the classifier sharing its encoder (with --cls-weight > 0)
    <out>/segmenter-last/   with --export-last: the segmenter of the last epoch
    <out>/train/            config.json, progress.jsonl, checkpoint.pt, best-*.safetensors,
                            packed-*.npz (the decoded images, reused on resume)

A killed run continues with `--resume --out <out>` (every setting comes from config.json).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from bus_core import atomic
from bus_core.constants import CLASSES, NORMAL
from bus_core.data.augment import FULL, Window, augment_batch
from bus_core.data.dataset import Record
from bus_core.data.images import load_image
from bus_core.data.inputs import record_lesion_mask
from bus_core.data.loader import class_weights
from bus_core.data.masks import lesion_free_box
from bus_core.data.presets import fit_square
from bus_core.errors import DataError, storage
from bus_core.metrics import compute_metrics, softmax
from bus_core.models.build import load_model
from bus_core.models.unet import DenseNetUNet
from bus_core.runtime.device import (
    DEVICE_CHOICES,
    autocast,
    choose_device,
    prepare_model,
    to_device,
)
from bus_core.training.averaging import (
    WeightAverage,
    add_shared_training_options,
    check_average_options,
)
from bus_core.training.mixstyle import MixStyle
from bus_core.training.runs import ProgressLog, RunFiles, next_epoch_fits
from bus_core.training.segmenter_common import (
    Packed,
    SegTrainConfig,
    forward_packed,
    source_subsets,
    square_figures,
)
from bus_core.training.segmenter_release import export_run
from bus_core.training.train import atomic_torch_save, save_weights

MIN_WINDOW = 0.35
"""A lesion-free window is used only when both its sides are at least this share of the image."""


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The command-line options of `python -m bus_core train-seg`."""
    p = argparse.ArgumentParser(description="Train the lesion segmenter (and optionally a "
                                "classifier on the same encoder).", add_help=add_help)
    p.add_argument("--data", action="append", default=[],
                   help="BUSI-layout folder or CSV manifest (repeat; one --split each)")
    p.add_argument("--split", action="append", default=[], help="split JSON of each --data")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--init", default="random",
                   help="'random' or a DenseNet121 classifier folder whose encoder (and head) "
                        "start the network")
    for name, kind, default in (("size", int, 224), ("cache-size", int, 256), ("epochs", int, 30),
                                ("epoch-size", int, 1200), ("batch-size", int, 16),
                                ("lr", float, 1e-3), ("encoder-lr", float, 1e-4),
                                ("weight-decay", float, 1e-4), ("cls-weight", float, 1.0),
                                ("normal-crops", float, 0.2), ("seed", int, 0),
                                ("checkpoint-every", float, 300.0)):
        p.add_argument(f"--{name}", type=kind, default=default)
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--train-stem", dest="freeze_stem", action="store_false",
                   help="also train the encoder's stem (conv0 .. transition1; frozen by default)")
    p.add_argument("--freeze-encoder", action="store_true",
                   help="train the decoder alone: the whole encoder keeps the weights of --init, "
                        "so the outline model and that classifier share one encoder pass "
                        "(needs --init FOLDER and --cls-weight 0)")
    add_shared_training_options(p)
    p.add_argument("--name", default="densenet121-unet-lesion-v1")
    p.add_argument("--classifier-name", default="densenet121-multitask-v1")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out with the settings it was started with")
    p.add_argument("--export-last", action="store_true",
                   help="also export the segmenter of the last epoch, as <out>/segmenter-last "
                        "(to compare with the best epoch by validation score in a reading; "
                        "with --resume, also of a finished run)")
    return p


# --- data -----------------------------------------------------------------------------------

def pack(records: Sequence[Record], size: int, cache: Path | None = None,
         progress: bool = False) -> Packed:
    """Decode `records` into a `Packed` at `size` (read from / written to `cache` if given)."""
    names = sorted({r.source for r in records})
    key = hashlib.sha256(json.dumps([size, [r.id for r in records]]).encode()).hexdigest()[:16]
    if cache is not None and cache.is_file():
        with np.load(cache) as z:
            if str(z["key"]) == key:
                return Packed([str(i) for i in z["ids"]], z["images"], z["masks"], z["labels"],
                              z["sources"], z["content"], [str(n) for n in z["source_names"]])
    n = len(records)
    images = np.zeros((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    content = np.zeros((n, 4), np.int32)
    for i, record in enumerate(tqdm(records, disable=not progress, desc="decode", unit="img")):
        image = load_image(record.path)
        images[i], fit = fit_square(image, size)
        masks[i] = fit_square(record_lesion_mask(record, image.shape[:2]).astype(np.uint8), size,
                              nearest=True)[0]
        h, w = image.shape[:2]
        content[i] = (fit.pad_x, fit.pad_y, fit.pad_x + round(w * fit.scale),
                      fit.pad_y + round(h * fit.scale))
    packed = Packed([r.id for r in records], images, masks,
                    np.array([CLASSES.index(r.label) for r in records], np.int64),
                    np.array([names.index(r.source) for r in records], np.int64), content, names)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(cache) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, key=key, ids=np.array(packed.ids), images=images, masks=masks,
                     labels=packed.labels, sources=packed.sources, content=content,
                     source_names=np.array(names))
    return packed


def lesion_free_window(mask: np.ndarray, content: Sequence[int], gap: float = 0.05
                       ) -> Window | None:
    """The largest window of the image's content (x0, y0, x1, y1) that keeps clear of the
    lesion's bounding box (`masks.lesion_free_box`), normalised; None when none is large
    enough."""
    x0, y0, x1, y1 = (int(v) for v in content)
    box = lesion_free_box(mask, (y0, y1, x0, x1), gap=gap, min_share=MIN_WINDOW)
    if box is None:
        return None
    by0, by1, bx0, bx1 = box
    size = mask.shape[0]
    return Window(cx=(bx0 + bx1) / size - 1, cy=(by0 + by1) / size - 1,
                  hx=(bx1 - bx0) / size, hy=(by1 - by0) / size)


@dataclass(frozen=True)
class Draw:
    """One item of an epoch: a packed index, and whether it is a lesion-free normal window."""

    index: int
    normal_crop: bool = False


def epoch_plan(packed: Packed, windows: dict[int, Window], epoch_size: int,
               normal_crops: float, seed: int, epoch: int) -> list[Draw]:
    """`epoch_size` draws, each source equally likely; in sources without normal images a share
    `normal_crops` of the draws (from images with a lesion-free window) become normal crops."""
    rng = np.random.default_rng([seed, epoch])
    normal = CLASSES.index(NORMAL)
    pools = []
    for s in range(len(packed.source_names)):
        ix = np.flatnonzero(packed.sources == s)
        if len(ix):
            has_normal = bool((packed.labels[ix] == normal).any())
            pools.append((ix, [] if has_normal else [int(i) for i in ix if int(i) in windows]))
    draws = []
    for _ in range(epoch_size):
        pool, cropable = pools[rng.integers(len(pools))]
        if cropable and rng.random() < normal_crops:
            draws.append(Draw(cropable[rng.integers(len(cropable))], True))
        else:
            draws.append(Draw(int(pool[rng.integers(len(pool))])))
    return draws


def class_weights_for(packed: Packed, windows: dict[int, Window], config: SegTrainConfig
                      ) -> torch.Tensor:
    """`loader.class_weights` of the expected epoch composition (normal crops included)."""
    plan = epoch_plan(packed, windows, 4000, config.normal_crops, config.seed, 10**6)
    return class_weights([CLASSES.index(NORMAL) if d.normal_crop else int(packed.labels[d.index])
                          for d in plan])


# --- losses and validation ------------------------------------------------------------------

def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE over every pixel + soft Dice over the items that have a lesion."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    has = target.flatten(1).sum(1) > 0
    if not has.any():
        return bce
    prob = torch.sigmoid(logits[has]).flatten(1)
    t = target[has].flatten(1)
    dice = (2 * (prob * t).sum(1) + 1) / (prob.sum(1) + t.sum(1) + 1)
    return bce + (1 - dice).mean()


def cls_summary(logits: np.ndarray, packed: Packed) -> dict[str, Any]:
    """Per source: accuracy, malignant AUC, macro-F1 (`metrics.compute_metrics`) and the share
    of lesion images called normal (argmax)."""
    probs = softmax(logits)
    normal = CLASSES.index(NORMAL)
    out: dict[str, Any] = {}
    for s, name in enumerate(packed.source_names):
        rows = packed.sources == s
        y = packed.labels[rows]
        figures = compute_metrics(y, probs[rows])
        lesion = y != normal
        out[name] = {
            "n": int(rows.sum()), "accuracy": figures["accuracy"],
            "auc_malignant": figures["auc_malignant"], "macro_f1": figures["macro_f1"],
            "lesion_called_normal": float((probs[rows][lesion].argmax(1) == normal).mean())
            if lesion.any() else None}
    return out


def _mean(values: Sequence[float | None]) -> float:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else 0.0


def seg_score(summary: dict[str, Any]) -> float:
    """Mean over sources of lesion Dice, and of the normal-empty share where there are normals."""
    return _mean([v["dice"] for v in summary.values()]
                 + [v["normal_empty_share"] for v in summary.values()])


def cls_score(summary: dict[str, Any]) -> float:
    """Mean over sources of malignant AUC, macro-F1 and (1 - share of lesions called normal)."""
    parts: list[float | None] = []
    for v in summary.values():
        parts += [v["auc_malignant"], v["macro_f1"],
                  None if v["lesion_called_normal"] is None else 1 - v["lesion_called_normal"]]
    return _mean(parts)


# --- the run --------------------------------------------------------------------------------

def config_from_args(args: argparse.Namespace) -> SegTrainConfig:
    """A config from parsed arguments, or the saved one of the run in --out with --resume."""
    if args.resume:
        path = RunFiles(Path(args.out)).config
        if not path.is_file():
            raise DataError(f"There is no run to resume in {args.out} (no train/config.json).")
        return SegTrainConfig(**json.loads(path.read_text()))
    if not args.data or len(args.data) != len(args.split):
        raise DataError("Give each --data its --split (the same number of each, at least one).")
    if args.freeze_encoder and (args.init == "random" or args.cls_weight > 0):
        raise DataError("--freeze-encoder keeps the encoder of a trained classifier: give it "
                        "with --init FOLDER and --cls-weight 0.")
    check_average_options(args.ema, args.ema_warmup)
    names = {f.name for f in dataclasses.fields(SegTrainConfig)}
    return SegTrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def subset_records(config: SegTrainConfig, subset: str) -> list[Record]:
    """The records of `subset` of every source together."""
    return [r for _, _, records in source_subsets(config, subset) for r in records]


STEM = ("conv0", "norm0", "relu0", "pool0", "denseblock1", "transition1")
"""The encoder's first layers, frozen by default: they are generic and cost most backward time."""


def freeze_encoder(model: DenseNetUNet, config: SegTrainConfig) -> None:
    """Stop training the stem (`config.freeze_stem`) or the whole encoder
    (`config.freeze_encoder`): no gradients, batch-norm statistics kept (eval mode)."""
    for name, layer in model.features.named_children():
        if config.freeze_encoder or (config.freeze_stem and name in STEM):
            layer.eval()
            layer.requires_grad_(False)


def init_network(config: SegTrainConfig) -> DenseNetUNet:
    """A fresh network; with `--init FOLDER` the encoder (and class head) of that classifier."""
    model = DenseNetUNet(num_classes=len(CLASSES) if config.cls_weight > 0 else 0)
    if config.init != "random":
        source = load_model(config.init)
        own = model.state_dict()
        state = {k: v for k, v in source.model.state_dict().items()
                 if k in own and own[k].shape == v.shape}
        model.load_state_dict(state, strict=False)
    return model


def main(args: argparse.Namespace) -> Path:
    """Train (or resume) and export; returns the run folder."""

    config = config_from_args(args)
    run_dir = config.run_dir
    files = RunFiles(Path(config.out))
    with storage(f"write the run folder {run_dir}"):
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic.remove_partial_writes(run_dir)
        atomic.write_text(files.config, json.dumps(dataclasses.asdict(config), indent=2))
    log = ProgressLog(files.progress)
    device = choose_device(config.device)
    torch.manual_seed(config.seed)
    train_packed = pack(subset_records(config, "train"), config.cache_size,
                        run_dir / "packed-train.npz", progress=True)
    val_packed = pack(subset_records(config, "val"), config.size, run_dir / "packed-val.npz",
                      progress=True)
    windows = {i: w for i in range(len(train_packed))
               if (w := lesion_free_window(train_packed.masks[i], train_packed.content[i]))}
    model = init_network(config)
    prepare_model(model, device)
    freeze_encoder(model, config)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    encoder = [p for n, p in trainable if n.startswith("features.")]
    rest = [p for n, p in trainable if not n.startswith("features.")]
    optimizer = torch.optim.AdamW([{"params": encoder, "lr": config.encoder_lr},
                                   {"params": rest, "lr": config.lr}],
                                  weight_decay=config.weight_decay)
    steps = math.ceil(config.epoch_size / config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[config.encoder_lr, config.lr], total_steps=config.epochs * steps,
        pct_start=0.1)
    weights = class_weights_for(train_packed, windows, config).to(device.device)
    average = WeightAverage(model, config.ema, config.ema_warmup)
    mixing = MixStyle(config.mixstyle) if config.mixstyle > 0 else None
    if mixing:  # after the average, whose copy of the network is never mixed
        mixing.attach(model.features)
    state: dict[str, Any] = {"epoch": 0, "step": 0, "best_seg": None, "best_cls": None,
                             "history": [], "train_time_s": 0.0}
    ckpt_path = files.checkpoint
    if args.resume and ckpt_path.is_file():
        saved = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        prepare_model(model, device)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        average.load_state_dict(saved.get("average"))
        state = saved["state"]
    log.write("start", resumed=bool(args.resume), epoch=state["epoch"], step=state["step"],
              device=device.to_dict(), n_train=len(train_packed), n_val=len(val_packed),
              n_windows=len(windows), class_weights=weights.tolist(),
              config=dataclasses.asdict(config))

    def save_checkpoint() -> None:
        atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "scheduler": scheduler.state_dict(), "state": state,
                            "average": average.state_dict()}, ckpt_path)

    last_save = time.monotonic()
    while state["epoch"] < config.epochs:
        epoch = state["epoch"]
        plan = epoch_plan(train_packed, windows, config.epoch_size, config.normal_crops,
                          config.seed, epoch)
        model.train()
        freeze_encoder(model, config)
        mark = time.monotonic()
        bar = tqdm(total=steps, initial=state["step"], desc=f"epoch {epoch + 1}/{config.epochs}",
                   unit="step")
        for step in range(state["step"], steps):
            draws = plan[step * config.batch_size:(step + 1) * config.batch_size]
            if len(draws) < 2:
                continue
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch * 10_007 + step)
            index = [d.index for d in draws]
            images = torch.from_numpy(train_packed.images[index]).to(device.device)
            masks = torch.from_numpy(train_packed.masks[index]).to(device.device)
            labels = torch.from_numpy(train_packed.labels[index]).clone()
            wins = []
            for k, d in enumerate(draws):
                if d.normal_crop:
                    masks[k] = 0  # a copy: indexing the packed array copied it
                    labels[k] = CLASSES.index(NORMAL)
                    wins.append(windows[d.index])
                else:
                    wins.append(FULL)
            x, m = augment_batch(images, masks, wins, config.size, gen,
                                 style=config.style_augment)
            x = to_device(x, device)
            if mixing:
                mixing.domains = torch.from_numpy(train_packed.sources[index])
            optimizer.zero_grad(set_to_none=True)
            with autocast(device):
                seg, cls = model.forward_both(x)
            loss = seg_loss(seg.float(), m)
            if cls is not None:
                loss = loss + config.cls_weight * F.cross_entropy(
                    cls.float(), labels.to(device.device), weight=weights,
                    label_smoothing=config.label_smoothing)
            loss.backward()
            optimizer.step()
            scheduler.step()
            average.update()
            state["step"] = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            log.write("step", epoch=epoch + 1, epochs=config.epochs, step=step + 1, steps=steps,
                      loss=loss.item())
            if time.monotonic() - last_save > config.checkpoint_every:
                state["train_time_s"] += time.monotonic() - mark
                mark = last_save = time.monotonic()
                save_checkpoint()
        bar.close()
        state["train_time_s"] += time.monotonic() - mark
        probs, logits = forward_packed(cast(DenseNetUNet, average.module), val_packed, device)
        seg_val = square_figures(probs, val_packed)
        record: dict[str, Any] = {"epoch": epoch + 1, "seg": seg_val,
                                  "seg_score": seg_score(seg_val)}
        if logits is not None:
            cls_val = cls_summary(logits, val_packed)
            record.update(cls=cls_val, cls_score=cls_score(cls_val))
        for kind in ("seg", "cls"):
            value = record.get(f"{kind}_score")
            if value is not None and (state[f"best_{kind}"] is None
                                      or value > state[f"best_{kind}"]["score"]):
                state[f"best_{kind}"] = {"score": value, "epoch": epoch + 1}
                save_weights(average.module, run_dir / f"best-{kind}.safetensors")
        state["history"].append(record)
        state.update(epoch=epoch + 1, step=0)
        save_checkpoint()
        last_save = time.monotonic()
        log.write("epoch", **record, train_time_s=state["train_time_s"])
        if state["epoch"] < config.epochs and not next_epoch_fits(
                config.time_limit, state["train_time_s"], state["epoch"]):
            log.write("time_limit", epoch=state["epoch"])
            break
    if args.export_last:
        save_weights(average.module, run_dir / "last-seg.safetensors")
    export_run(config, device, state, val_packed, log, last=args.export_last)
    return Path(config.out)


def run(argv: Sequence[str] | None = None) -> Path:
    """Parse `argv` and train."""
    return main(get_args_parser().parse_args(argv))


if __name__ == "__main__":
    run()
