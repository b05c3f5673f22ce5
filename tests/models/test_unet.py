"""The segmentation network, post-processing, geometry, the Segmenter and the segment CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bus_core.data.presets import fit_square, unfit_square
from bus_core.errors import ModelError
from bus_core.inference.outline import Segmenter, list_inputs, segment_inputs
from bus_core.models.build import build_model, load_model
from bus_core.models.card import read_card
from bus_core.models.unet import (
    DenseNetUNet,
    PostProcess,
    dice_iou,
    fill_holes,
    postprocess,
    shares_encoder,
)
from tests.conftest import ADMIN, blob_probabilities, copy_model, synthetic_image


def test_network_shapes_with_and_without_class_head():
    net = DenseNetUNet(num_classes=3).eval()
    with torch.inference_mode():
        seg, cls = net.forward_both(torch.randn(2, 3, 64, 64))
        assert seg.shape == (2, 1, 64, 64) and cls.shape == (2, 3)
        assert net(torch.randn(1, 3, 96, 96)).shape == (1, 1, 96, 96)
    assert DenseNetUNet().forward_both(torch.randn(2, 3, 64, 64))[1] is None


def test_encoder_and_head_share_the_classifier_keys():
    classifier = build_model("densenet121")
    net = DenseNetUNet(num_classes=3)
    own = net.state_dict()
    shared = {k: v for k, v in classifier.state_dict().items() if k in own}
    assert set(shared) == set(classifier.state_dict())  # every classifier tensor has a home
    net.load_state_dict(shared, strict=False)
    assert torch.equal(net.state_dict()["features.conv0.weight"],
                       classifier.state_dict()["features.conv0.weight"])


def test_postprocess_threshold_small_components_and_holes():
    prob = np.zeros((100, 100))
    prob[20:60, 20:60] = 0.9
    prob[35:45, 35:45] = 0.1  # a hole
    prob[90:92, 90:92] = 0.9  # 4 px speck
    mask = postprocess(prob, PostProcess(threshold=0.5, min_area=0.001, fill_holes=True))
    assert mask[40, 40] and not mask[91, 91] and mask.sum() == 40 * 40
    assert not postprocess(prob, PostProcess(threshold=0.95)).any()
    kept = postprocess(prob, PostProcess(threshold=0.5, min_area=0.0, fill_holes=False))
    assert kept[91, 91] and not kept[40, 40]


def test_fill_holes_matches_scipy_on_random_masks():
    from scipy import ndimage

    rng = np.random.default_rng(0)
    for _ in range(200):
        h, w = rng.integers(3, 90, 2)
        noise = ndimage.gaussian_filter(rng.random((h, w)), rng.uniform(0.5, 4))
        mask = noise > rng.uniform(0.45, 0.55)
        np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
    assert fill_holes(np.ones((4, 4), bool)).all() and not fill_holes(np.zeros((4, 4), bool)).any()
    ring = np.zeros((7, 7), bool)
    ring[1:6, 1:6] = True
    ring[3, 3] = False
    assert fill_holes(ring)[3, 3]
    ring[3, 1] = False  # a notch in the ring that does not reach the hole: still a hole
    assert fill_holes(ring)[3, 3]
    ring[3, 1:3] = False  # a gap from the hole to the outside: no longer a hole
    assert not fill_holes(ring)[3, 3]


def test_dice_and_iou():
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    assert dice_iou(a, b) == (1.0, 1.0)
    a[:, :5] = True
    b[:, :5] = True
    assert dice_iou(a, b) == (1.0, 1.0)
    b[:] = False
    b[:, 5:] = True
    assert dice_iou(a, b) == (0.0, 0.0)
    b[:] = False
    b[:5, :5] = True
    dice, iou = dice_iou(a, b)
    assert dice == pytest.approx(2 * 25 / 75) and iou == pytest.approx(0.5)


@pytest.mark.parametrize("shape", [(50, 120), (120, 50), (64, 64)])
def test_fit_square_keeps_the_whole_image_and_unfit_maps_back(shape):
    image = np.zeros(shape + (3,), np.uint8)
    image[: shape[0] // 2] = 200
    square, fit = fit_square(image, 32)
    assert square.shape == (32, 32, 3)
    back = unfit_square(square[..., 0].astype(np.float32), fit, shape)
    assert back.shape == shape
    assert back[: shape[0] // 2 - 3].mean() > 150 and back[shape[0] // 2 + 3:].mean() < 50


def test_segmentation_card_round_trip(tiny_segmenter_dir):
    card = read_card(tiny_segmenter_dir)
    assert card.task == "segmentation" and card.size.fit == "pad"
    loaded = load_model(tiny_segmenter_dir)
    assert isinstance(loaded.model, DenseNetUNet)


def test_a_classifier_is_not_a_segmenter(tiny_model_dir):
    with pytest.raises(ModelError, match="not a segmentation model"):
        Segmenter(load_model(tiny_model_dir))


def test_segmenter_returns_a_mask_of_the_image_size(tiny_segmenter_dir, monkeypatch):
    segmenter = Segmenter.from_path(tiny_segmenter_dir)
    image, _ = synthetic_image("benign", np.random.default_rng(0), size=(70, 130))
    probs = segmenter.probabilities([image])[0]
    assert probs.shape == (70, 130) and 0 <= probs.min() and probs.max() <= 1
    monkeypatch.setattr(Segmenter, "probabilities", blob_probabilities)
    mask = segmenter.segment(image)
    assert mask.shape == (70, 130) and mask.dtype == bool and mask[35, 65]


def test_set_active_model_refuses_a_segmenter(tiny_segmenter_dir, tmp_path, monkeypatch):
    from bus_core.models.registry import set_active_model

    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path))
    with pytest.raises(ModelError, match="Only a classification model"):
        set_active_model(tiny_segmenter_dir, who=ADMIN)


def _folder_with_a_corrupt_file(root):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(2):
        image, _ = synthetic_image("benign", rng, size=(60 + 10 * i, 80))
        Image.fromarray(image).save(root / f"scan {i}.png")
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "scan 0_mask.png")  # not an input
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def test_list_inputs_of_a_flat_folder_leaves_masks_out(tmp_path):
    folder = _folder_with_a_corrupt_file(tmp_path)
    assert [p.name for p in list_inputs([folder])] == ["broken.png", "scan 0.png", "scan 1.png"]


def test_segment_inputs_skips_bad_files_and_writes_binary_masks(tiny_segmenter_dir, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setattr(Segmenter, "probabilities", blob_probabilities)
    folder = _folder_with_a_corrupt_file(tmp_path / "in")
    report = segment_inputs([folder], tmp_path / "out", Segmenter.from_path(tiny_segmenter_dir))
    assert report.written == 2 and [n for n, _ in report.skipped] == ["broken.png"]
    mask = Image.open(tmp_path / "out" / "scan 1_mask.png")
    assert mask.mode == "L" and mask.size == (80, 70)
    assert set(np.unique(np.asarray(mask))) == {0, 255}


def test_segment_cli_on_a_busi_folder_and_a_corrupt_file(tiny_segmenter_dir, busi_dir, tmp_path,
                                                         capsys):
    from bus_core.cli.main import main

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nonsense")
    code = main(["segment", str(busi_dir), str(bad), "--out", str(tmp_path / "masks"),
                 "--model", str(tiny_segmenter_dir)])
    out, err = capsys.readouterr()
    assert code == 0
    assert "18 masks written" in out and "1 files skipped" in out
    assert "Skipped bad.png" in err
    names = sorted(p.name for p in (tmp_path / "masks").iterdir())
    assert len(names) == 18 and all(n.endswith("_mask.png") for n in names)
    first = Image.open(busi_dir / "benign" / "benign (1).png")
    assert Image.open(tmp_path / "masks" / "benign (1)_mask.png").size == first.size


def test_evaluate_cli_on_a_segmentation_model(tiny_segmenter_dir, busi_dir, tmp_path, capsys,
                                              monkeypatch):
    import json

    from bus_core.cli.main import main

    monkeypatch.setattr(Segmenter, "probabilities", blob_probabilities)
    out_json = tmp_path / "seg.json"
    assert main(["evaluate", "--model", str(tiny_segmenter_dir), "--data", str(busi_dir),
                 "--json", str(out_json)]) == 0
    assert "Dice" in capsys.readouterr().out
    result = json.loads(out_json.read_text())
    assert result["n"] == 18 and result["n_lesion"] == 12 and result["n_normal"] == 6
    assert result["lesion_empty_share"] == 0.0 and result["normal_empty_share"] == 0.0
    assert 0 < result["dice"] < 1 and len(result["per_image"]) == 18


@pytest.fixture
def mask_model_dir(tiny_model_dir, tmp_path):
    return copy_model(tiny_model_dir, tmp_path / "mask-model", name="tiny-lesion",
                      input_mode="mask-leakfree")


def test_lesion_model_reads_the_automatic_outline(mask_model_dir, tiny_segmenter_dir, busi_dir,
                                                  tmp_path, capsys, monkeypatch):
    import json

    from bus_core.cli.main import main

    monkeypatch.setattr(Segmenter, "probabilities", blob_probabilities)
    image = busi_dir / "malignant" / "malignant (1).png"
    assert main(["predict", str(image), "--model", str(mask_model_dir), "--segmenter",
                 str(tiny_segmenter_dir), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mask"] == "automatic outline by tiny-seg"
    metrics = tmp_path / "auto.json"
    assert main(["evaluate", "--model", str(mask_model_dir), "--data", str(busi_dir),
                 "--masks", "auto", "--segmenter", str(tiny_segmenter_dir),
                 "--mask-dir", str(tmp_path / "auto-masks"), "--json", str(metrics)]) == 0
    assert "on the outlines the outline model suggests" in capsys.readouterr().out
    assert json.loads(metrics.read_text())["data"]["masks"] == "automatic"
    assert len(list((tmp_path / "auto-masks").iterdir())) == 18


def test_no_automatic_outline_is_a_clear_error(mask_model_dir, tiny_segmenter_dir, tmp_path,
                                               capsys, monkeypatch):
    from bus_core.cli.main import main

    monkeypatch.setattr(Segmenter, "probabilities", blob_probabilities)
    white_corner, _ = synthetic_image("normal", np.random.default_rng(0), size=(80, 90))
    white_corner[0, 0] = 255
    path = tmp_path / "n.png"
    Image.fromarray(white_corner).save(path)
    assert main(["predict", str(path), "--model", str(mask_model_dir), "--segmenter",
                 str(tiny_segmenter_dir)]) == 2
    assert "finds no lesion" in capsys.readouterr().err


def test_shares_encoder_compares_every_encoder_tensor():
    torch.manual_seed(0)
    classifier, outline = build_model("densenet121"), DenseNetUNet()
    assert not shares_encoder(outline, classifier)
    outline.features.load_state_dict(classifier.features.state_dict())
    assert shares_encoder(outline, classifier)
    outline.features.norm5.running_mean += 1e-3  # batch-norm statistics count too
    assert not shares_encoder(outline, classifier)
