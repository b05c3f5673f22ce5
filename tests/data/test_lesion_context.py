"""The `lesion-context` input mode: unmasked lesion crops, jittered boxes, tissue windows as
normal examples, outline variants and their agreement, merged splits."""

import csv
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from bus_core.cli.main import main
from bus_core.constants import CLASSES
from bus_core.data.dataset import load_records
from bus_core.data.inputs import InputSpec, lesion_free_strip, model_input, record_input
from bus_core.data.loader import Item, RecordDataset, epoch_plan, tissue_pool
from bus_core.data.masks import box_of, jitter_box, lesion_free_box, outline_variant, tissue_window
from bus_core.data.presets import InputSize
from bus_core.data.splits import load_split, make_split, merge_splits, save_split
from bus_core.errors import DataError, MaskError
from bus_core.evaluation.evaluate import Evaluation, outline_agreement, two_stage
from bus_core.models.build import load_model
from bus_core.training.train import TrainConfig, train
from tests.conftest import synthetic_image

SPEC = InputSpec(mode="lesion-context", margin=0.5, size=InputSize(40, 32, "pad"))


def _disc(shape=(100, 120), centre=(50, 60), radius=10) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius ** 2


def test_context_crop_keeps_the_tissue_around_the_lesion_unmasked():
    image = np.random.default_rng(0).integers(20, 255, (100, 120, 3), dtype=np.uint8)
    mask = _disc()
    crop = model_input(image, [mask], SPEC)
    y0, y1, x0, x1 = box_of(mask)
    assert (y0, y1, x0, x1) == (41, 60, 51, 70)
    # the box (19 px) grown by half its size on each side, and nothing blacked out
    assert crop.shape[:2] == (39, 39)
    assert np.array_equal(crop, image[31:70, 41:80])
    with pytest.raises(MaskError):
        model_input(image, [], SPEC)


def test_expert_dilated_and_box_outlines_give_nearly_the_same_input():
    image = np.zeros((100, 120, 3), np.uint8)
    mask = _disc()
    crops = {kind: model_input(image, [outline_variant(mask, kind)], SPEC)
             for kind in ("expert", "dilated", "box")}
    assert crops["box"].shape == crops["expert"].shape
    grown = crops["dilated"].shape[0] / crops["expert"].shape[0]
    assert 1.1 < grown < 1.5  # dilated by 15% of the diameter on each side
    box = outline_variant(mask, "box")
    assert box.sum() == 19 * 19 and box_of(box) == box_of(mask)
    assert outline_variant(np.zeros((5, 5), bool), "dilated").sum() == 0
    with pytest.raises(ValueError):
        outline_variant(mask, "ellipse")


def test_jittered_boxes_vary_stay_inside_and_are_reproducible():
    box = (40, 60, 50, 70)
    boxes = [jitter_box(box, (100, 120), np.random.default_rng(i)) for i in range(50)]
    assert len(set(boxes)) > 40
    for y0, y1, x0, x1 in boxes:
        assert 0 <= y0 < y1 <= 100 and 0 <= x0 < x1 <= 120
        assert 0.7 * 20 <= y1 - y0 <= 1.45 * 20
    assert jitter_box(box, (100, 120), np.random.default_rng(3)) == boxes[3]
    edge = jitter_box((0, 3, 117, 120), (100, 120), np.random.default_rng(0))
    assert edge[0] < edge[1] and edge[2] < edge[3] <= 120


def test_tissue_windows_and_lesion_free_strips():
    image = np.zeros((100, 120, 3), np.uint8)
    image[10:90, 20:100] = 128  # imaged area inside a black border
    for seed in range(20):
        y0, y1, x0, x1 = tissue_window(image, np.random.default_rng(seed))
        assert 10 <= y0 < y1 <= 90 and 20 <= x0 < x1 <= 100
        assert 0.25 * 80 - 1 <= y1 - y0 <= 0.6 * 80 + 1
    lesion = np.zeros((100, 120), bool)
    lesion[40:60, 20:40] = True  # at the left: the strip right of it is the largest
    y0, y1, x0, x1 = lesion_free_box(lesion, (10, 90, 20, 100))
    assert (y0, y1) == (10, 90) and x0 >= 40 + 4 and x1 == 100
    whole = np.zeros((100, 120), bool)
    whole[10:90, 20:100] = True
    assert lesion_free_box(whole, (10, 90, 20, 100)) is None
    strip = lesion_free_strip(image, lesion)
    assert strip is not None and strip[0] >= 10 + 9 and strip[1] <= 90 - 9  # text bands


def test_record_inputs_eval_fixed_train_jittered_normals_are_tissue(busi_dir):
    records = load_records(busi_dir)
    lesion = next(r for r in records if r.label == "malignant")
    normal = next(r for r in records if r.label == "normal")
    fixed = record_input(lesion, SPEC)
    assert np.array_equal(fixed, record_input(lesion, SPEC))
    jittered = {record_input(lesion, SPEC, np.random.default_rng(i), jitter=True).shape
                for i in range(8)}
    assert len(jittered) > 1
    window = record_input(normal, SPEC)
    assert window.max() > 0 and np.array_equal(window, record_input(normal, SPEC))


def _one_source_without_normals(root):
    """A CSV manifest of lesion images only (like BUS-BRA), lesions in the left third."""
    rng = np.random.default_rng(5)
    rows = []
    for i, label in enumerate(["benign", "malignant"] * 3):
        image, _ = synthetic_image(label, rng, size=(80, 120))
        mask = np.zeros((80, 120), bool)
        mask[30:50, 10:30] = True
        Image.fromarray(image).save(root / f"img{i}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / f"img{i}_m.png")
        rows.append({"path": f"img{i}.png", "mask": f"img{i}_m.png", "label": label,
                     "patient": f"p{i}"})
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "mask", "label", "patient"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "labels.csv"


def test_tissue_pool_takes_lesion_images_of_sources_without_normals(busi_dir, tmp_path):
    manifest = _one_source_without_normals(tmp_path)
    records = load_records(busi_dir) + load_records(manifest)
    ds = RecordDataset(records, SPEC, train=True)
    pool = tissue_pool(ds)
    assert pool and {records[i].source for i in pool} == {records[-1].source}
    x, y = ds[Item(pool[0], tissue=True)]
    assert x.shape == (3, 32, 32) and y == CLASSES.index("normal")
    assert ds[Item(pool[0])][1] == ds.labels[pool[0]]


def test_epoch_plan_adds_tissue_normals_and_balances_them():
    labels = [1] * 6 + [2] * 4
    plan = epoch_plan(labels, "none", 0, 0, tissue_pool=[0, 1, 6], tissue_share=0.5)
    tissue = [it for it in plan if it.tissue]
    assert len(plan) == 15 and len(tissue) == 5 and {it.index for it in tissue} <= {0, 1, 6}
    balanced = epoch_plan(labels, "augment", 0, 0, tissue_pool=[0, 1, 6], tissue_share=0.5)
    counts = Counter(0 if it.tissue else labels[it.index] for it in balanced)
    assert counts == {0: 6, 1: 6, 2: 6}
    assert epoch_plan(labels, "sampler", 2, 1, tissue_pool=[0], tissue_share=0.3) == \
        epoch_plan(labels, "sampler", 2, 1, tissue_pool=[0], tissue_share=0.3)
    assert not any(it.tissue for it in epoch_plan(labels, "none", 0, 0))


def _evaluation(preds, y, classes=CLASSES):
    probs = np.eye(len(classes))[preds]
    return Evaluation({}, [str(i) for i in range(len(y))], np.asarray(y), probs, probs,
                      list(classes))


def test_outline_agreement_counts_lesion_images_only():
    y = [0, 1, 1, 2, 2]
    summary = outline_agreement({"expert": _evaluation([0, 1, 2, 2, 2], y),
                                 "dilated": _evaluation([1, 1, 2, 2, 1], y),
                                 "box": _evaluation([0, 1, 1, 2, 2], y)})
    assert summary["n_lesion"] == 4 and summary["reference"] == "expert"
    assert summary["same_class_as_reference"] == {"dilated": 0.75, "box": 0.75}
    assert summary["all_agree"] == 0.5


def test_merge_splits_joins_data_sets_and_refuses_overlap(busi_dir, tmp_path):
    manifest = _one_source_without_normals(tmp_path)
    a_records, b_records = load_records(busi_dir), load_records(manifest)
    a = make_split(a_records, groups={r.id: r.id for r in a_records})
    b = make_split(b_records, groups={r.id: r.id for r in b_records})
    merged = merge_splits([a, b], a_records + b_records)
    assert merged.train == sorted(a.train + b.train) and merged.test == sorted(a.test + b.test)
    assert merged.stats["n_images"] == len(a_records) + len(b_records)
    with pytest.raises(DataError, match="share"):
        merge_splits([a, a], a_records)
    with pytest.raises(DataError, match="not in the data"):
        merge_splits([a, b], a_records)
    out = tmp_path / "ab.json"
    save_split(a, tmp_path / "a.json")
    save_split(b, tmp_path / "b.json")
    assert main(["split", "--data", str(busi_dir), "--data", str(manifest), "--merge",
                 str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(out)]) == 0
    assert load_split(out).ids() == merged.ids()


@pytest.mark.slow
def test_train_a_lesion_context_model_and_check_its_outlines(busi_dir, tmp_path, capsys):
    manifest = _one_source_without_normals(tmp_path)
    config = TrainConfig(data=[str(busi_dir), str(manifest)], out=str(tmp_path / "m"),
                         input_mode="lesion-context", fit="pad", resize=40, crop=32,
                         crop_margin=0.5, tissue_share=0.5, batch_size=4, epochs=1,
                         device="cpu-fp32", workers=0, checkpoint_every=0)
    card = train(config).card
    assert card.input_mode == "lesion-context" and card.crop_margin == 0.5
    assert card.input_size == {"resize": 40, "crop": 32, "fit": "pad"}
    assert card.malignant_threshold is not None
    assert card.metrics["val"]["at_threshold"]["sensitivity"] >= 0.9
    loaded = load_model(tmp_path / "m")
    assert InputSpec.from_card(loaded.card).mode == "lesion-context"
    out = tmp_path / "agreement.json"
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--data", str(busi_dir),
                 "--outline-check", "--json", str(out), "--device", "cpu-fp32"]) == 0
    summary = json.loads(out.read_text())["outline_agreement"]
    assert summary["n_lesion"] == 12 and set(summary["same_class_as_reference"]) == {
        "dilated", "box"}
    assert "all outlines agree" in capsys.readouterr().out
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--data", str(busi_dir),
                 "--masks", "box", "--device", "cpu-fp32"]) == 0


def test_two_stage_takes_the_lesion_model_where_an_outline_was_found():
    y = [0, 1, 2, 2]
    lesion = _evaluation([1, 1, 2, 0], y)
    whole = _evaluation([0, 0, 0, 2], y)
    result = two_stage(lesion, whole, [False, True, True, False])
    assert result.probs.argmax(1).tolist() == [0, 1, 2, 2]
    assert result.metrics["accuracy"] == 1.0 and result.metrics["outlined"] == 2
    with pytest.raises(ValueError):
        two_stage(lesion, _evaluation([0, 0, 0], y[:3]), [True] * 4)


def test_two_stage_can_take_normal_from_the_whole_image():
    y = [0, 1, 2]
    lesion = Evaluation({}, ["a", "b", "c"], np.asarray(y),
                        np.array([[0.8, 0.1, 0.1], [0.5, 0.4, 0.1], [0.0, 0.2, 0.8]]),
                        np.zeros((3, 3)), list(CLASSES))
    whole = Evaluation({}, ["a", "b", "c"], np.asarray(y),
                       np.array([[0.9, 0.05, 0.05], [0.2, 0.6, 0.2], [0.5, 0.25, 0.25]]),
                       np.zeros((3, 3)), list(CLASSES))
    result = two_stage(lesion, whole, [False, True, True], normal_from_whole=True)
    np.testing.assert_allclose(result.probs, [[0.9, 0.05, 0.05], [0.2, 0.64, 0.16],
                                              [0.5, 0.1, 0.4]])
    assert result.metrics["normal_from_whole"] is True
    assert result.probs.argmax(1).tolist() == [0, 1, 0]


def test_two_stage_command(busi_dir, tiny_model_dir, tiny_segmenter_dir, tmp_path, monkeypatch,
                           capsys):
    from bus_core.inference.outline import Segmenter
    from tests.conftest import blob_probabilities, copy_model

    monkeypatch.setattr(Segmenter, "probabilities", blob_probabilities)
    lesion_model = copy_model(tiny_model_dir, tmp_path / "lesion", input_mode="lesion-context",
                              crop_margin=0.5)
    out = tmp_path / "two.json"
    assert main(["evaluate", "--model", str(lesion_model), "--data", str(busi_dir),
                 "--masks", "auto", "--segmenter", str(tiny_segmenter_dir),
                 "--whole-image-model", str(tiny_model_dir), "--malignant-threshold", "0.3",
                 "--normal-from-whole", "--json", str(out), "--device", "cpu-fp32"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["n"] == 18 and metrics["outlined"] == 18  # the stand-in always finds a disc
    assert metrics["normal_from_whole"] is True
    assert metrics["at_threshold"]["threshold"] == 0.3 and "fitted_threshold" in metrics
    assert main(["evaluate", "--model", str(lesion_model), "--data", str(busi_dir),
                 "--masks", "expert", "--whole-image-model", str(tiny_model_dir)]) == 2
    assert "--masks auto" in capsys.readouterr().err
