"""Multi-source segmentation / multi-task training: data packing, lesion-free windows, epoch
plans, losses, augmentation, and a tiny run end to end with resume."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from bus_core.data.augment import FULL, Window, augment_batch
from bus_core.data.dataset import load_records
from bus_core.data.splits import make_split, save_split
from bus_core.models.build import load_model
from bus_core.models.card import read_card
from bus_core.training.segmenter import (
    epoch_plan,
    get_args_parser,
    lesion_free_window,
    main,
    pack,
    seg_loss,
)
from bus_core.training.segmenter_common import Packed
from tests.conftest import synthetic_image


def _packed(sources, labels, size=32):
    n = len(labels)
    masks = np.zeros((n, size, size), np.uint8)
    masks[:, 10:20, 4:12] = 1
    return Packed([f"id{i}" for i in range(n)], np.zeros((n, size, size, 3), np.uint8), masks,
                  np.array(labels), np.array(sources), np.tile([0, 0, size, size], (n, 1)),
                  ["A", "B"])


def test_lesion_free_window_keeps_clear_of_the_lesion():
    mask = np.zeros((100, 100), bool)
    mask[40:60, 5:30] = True
    window = lesion_free_window(mask, (0, 0, 100, 100))
    assert window is not None
    left = (window.cx - window.hx + 1) * 50  # back to pixels
    assert left >= 30 and window.hx * 50 * 2 >= 35
    mask[:, 10:90] = True
    assert lesion_free_window(mask, (0, 0, 100, 100)) is None


def test_epoch_plan_balances_sources_and_crops_normals_only_where_none_exist():
    packed = _packed(sources=[0] * 4 + [1] * 36, labels=[0, 1, 2, 1] + [1, 2] * 18)
    windows = {i: Window(0.5, 0, 0.4, 0.9) for i in range(40)}
    plan = epoch_plan(packed, windows, 2000, 0.25, seed=0, epoch=3)
    from_a = sum(packed.sources[d.index] == 0 for d in plan)
    assert 900 < from_a < 1100  # each source about half, whatever its size
    crops = [d for d in plan if d.normal_crop]
    assert crops and all(packed.sources[d.index] == 1 for d in crops)
    assert 0.2 < len(crops) / (2000 - from_a) < 0.3
    assert plan == epoch_plan(packed, windows, 2000, 0.25, seed=0, epoch=3)
    assert plan != epoch_plan(packed, windows, 2000, 0.25, seed=0, epoch=4)


def test_seg_loss_prefers_the_right_map_and_handles_empty_targets():
    target = torch.zeros(2, 1, 8, 8)
    target[0, 0, 2:6, 2:6] = 1
    right = (target * 2 - 1) * 8
    assert seg_loss(right, target) < seg_loss(-right, target)
    empty = torch.zeros(2, 1, 8, 8)
    assert seg_loss(torch.full((2, 1, 8, 8), -8.0), empty) < 0.01


def test_augment_batch_shapes_binary_masks_and_reproducible():
    images = torch.randint(0, 255, (3, 48, 48, 3), dtype=torch.uint8)
    masks = torch.zeros(3, 48, 48, dtype=torch.uint8)
    masks[:, 10:30, 10:30] = 1
    wins = [FULL, FULL, Window(0.5, 0.5, 0.3, 0.3)]
    x1, m1 = augment_batch(images, masks, wins, 32, torch.Generator().manual_seed(5))
    x2, m2 = augment_batch(images, masks, wins, 32, torch.Generator().manual_seed(5))
    assert x1.shape == (3, 3, 32, 32) and m1.shape == (3, 1, 32, 32)
    assert set(m1.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(x1, x2) and torch.equal(m1, m2)


def _two_sources(root):
    """A BUSI-like folder with normals and a CSV source of lesions only, each with a split."""
    from tests.conftest import write_busi

    busi = write_busi(root, per_class=6)
    other = root / "OTHER"
    other.mkdir()
    rng = np.random.default_rng(3)
    rows = []
    for i in range(16):
        label = ("benign", "malignant")[i % 2]
        image, mask = synthetic_image(label, rng, size=(60, 76))
        Image.fromarray(image).save(other / f"img{i}.png")
        Image.fromarray((mask * 255).astype(np.uint8)).save(other / f"img{i}_m.png")
        rows.append({"path": f"img{i}.png", "mask": f"img{i}_m.png", "label": label,
                     "patient": str(i // 2)})
    with open(other / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "mask", "label", "patient"])
        writer.writeheader()
        writer.writerows(rows)
    splits = []
    for source in (busi, other / "labels.csv"):
        path = root / f"{source.stem}-split.json"
        save_split(make_split(load_records(source), seed=0), path)
        splits.append(path)
    return [busi, other / "labels.csv"], splits


def test_pack_caches_decoded_images(tmp_path):
    (busi, _), _ = _two_sources(tmp_path)
    records = load_records(busi)[:4]
    packed = pack(records, 32, tmp_path / "cache.npz")
    again = pack(records, 32, tmp_path / "cache.npz")
    assert np.array_equal(packed.images, again.images) and again.ids == [r.id for r in records]
    assert isinstance(again.source_names[0], str) and isinstance(again.ids[0], str)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("segrun")
    data, splits = _two_sources(root)
    argv = []
    for d, s in zip(data, splits):
        argv += ["--data", str(d), "--split", str(s)]
    argv += ["--out", str(root / "run"), "--size", "64", "--cache-size", "72", "--epochs", "1",
             "--epoch-size", "8", "--batch-size", "4", "--device", "cpu-fp32", "--ema", "0.5",
             "--style-augment", "--mixstyle", "0.5"]
    out = main(get_args_parser().parse_args(argv))
    return out


@pytest.mark.slow
def test_tiny_run_exports_a_segmenter_and_a_classifier(tiny_run):
    seg = read_card(tiny_run / "segmenter")
    assert seg.task == "segmentation" and seg.input_size["fit"] == "pad"
    assert set(seg.postprocess) == {"threshold", "min_area", "fill_holes"}
    assert set(seg.metrics["test"]) == {"BUSI", "OTHER"}
    assert seg.split["files"][0]["file_sha256"]
    assert seg.hyperparameters["ema"] == 0.5 and seg.hyperparameters["style_augment"]
    assert seg.hyperparameters["mixstyle"] == 0.5
    assert seg.hyperparameters["epochs_trained"] == 1
    clf = load_model(tiny_run / "classifier")
    assert clf.card.task == "classification" and clf.card.size.fit == "pad"
    assert clf.card.malignant_threshold is not None
    assert "at_threshold" in clf.card.metrics["test"]
    assert set(clf.card.metrics["by_source"]) == {"BUSI", "OTHER"}
    assert clf.card.hyperparameters["mixstyle"] == 0.5


@pytest.mark.slow
def test_resume_takes_every_setting_from_the_run(tiny_run):
    config = json.loads((tiny_run / "train" / "config.json").read_text())
    args = get_args_parser().parse_args(["--out", str(tiny_run), "--resume", "--epochs", "50"])
    from bus_core.training.segmenter import config_from_args

    assert config_from_args(args).epochs == config["epochs"] == 1


@pytest.mark.slow
def test_frozen_encoder_run_keeps_the_classifiers_encoder(tiny_run, tmp_path):
    data, splits = _two_sources(tmp_path)
    argv = []
    for d, s in zip(data, splits):
        argv += ["--data", str(d), "--split", str(s)]
    argv += ["--out", str(tmp_path / "run"), "--size", "64", "--cache-size", "72", "--epochs",
             "2", "--epoch-size", "8", "--batch-size", "4", "--device", "cpu-fp32",
             "--init", str(tiny_run / "classifier"), "--freeze-encoder", "--cls-weight", "0",
             "--lr", "0.1", "--export-last"]
    out = main(get_args_parser().parse_args(argv))
    classifier = load_model(tiny_run / "classifier").model.state_dict()
    for folder in ("segmenter", "segmenter-last"):
        segmenter = load_model(out / folder)
        hyper = segmenter.card.hyperparameters
        assert hyper["freeze_encoder"] and hyper["epochs_trained"] == 2
        assert hyper["exported_epoch"] == (2 if folder == "segmenter-last" else hyper["best_epoch"])
        for name, tensor in segmenter.model.state_dict().items():
            if name.startswith("features."):
                assert torch.equal(tensor, classifier[name]), name
    assert not (out / "classifier").exists()


def test_freeze_encoder_needs_a_classifier_to_start_from(tmp_path):
    from bus_core.errors import DataError
    from bus_core.training.segmenter import config_from_args

    base = ["--data", "d", "--split", "s", "--out", str(tmp_path), "--freeze-encoder"]
    for extra in ([], ["--init", "x"], ["--cls-weight", "0"]):
        args = get_args_parser().parse_args(base + extra)
        with pytest.raises(DataError, match="--freeze-encoder"):
            config_from_args(args)
