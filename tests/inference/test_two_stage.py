"""The two-stage reading served as one model: a lesion model whose card names a whole-image model
(P(normal), images without an outline) and an outline model (suggests the outline), in
`predict.Predictor`, `evaluate.evaluate`, batch prediction and the command line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from bus_core.cli.main import main
from bus_core.constants import CLASSES
from bus_core.data.dataset import load_records
from bus_core.errors import ModelError
from bus_core.evaluation.evaluate import Evaluation, evaluate, two_stage
from bus_core.evaluation.intervals import score
from bus_core.inference.batch import predict_to_csv
from bus_core.inference.outline import Segmenter
from bus_core.inference.predict import Predictor
from bus_core.metrics import NORMAL_ODDS_GRID, fit_normal_odds, normal_from_whole
from bus_core.models.build import load_model
from bus_core.models.card import ModelCard
from tests.conftest import blob_probabilities, copy_model, synthetic_image

PAIR = {"whole_image_model": "whole", "outline_model": "outline"}


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path, tiny_segmenter_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights folder with a two-stage lesion model ('lesion') beside its whole-image model
    ('whole') and its outline model ('outline'), and 'alone': the lesion model without the
    pair."""
    root = tmp_path_factory.mktemp("weights")
    copy_model(tiny_model_dir, root / "whole", name="tiny-whole")
    copy_model(tiny_segmenter_dir, root / "outline")
    lesion = {"input_mode": "lesion-context", "crop_margin": 0.5, "malignant_threshold": 0.3}
    copy_model(tiny_model_dir, root / "lesion", name="tiny-lesion", two_stage=PAIR, **lesion)
    copy_model(tiny_model_dir, root / "alone", name="tiny-alone", **lesion)
    return root


@pytest.fixture
def blobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The outline model finds a disc in every image, none in images with a white corner."""
    monkeypatch.setattr(Segmenter, "probabilities", blob_probabilities)


def _predictor(folder: Path) -> Predictor:
    return Predictor(load_model(folder), "cpu-fp32", backend="torch")


def _image(white_corner: bool = False) -> np.ndarray:
    image, _ = synthetic_image("benign", np.random.default_rng(3))
    if white_corner:
        image[0, 0] = 255
    return image


def _probs(prediction) -> np.ndarray:
    return np.array([prediction.probabilities[c] for c in CLASSES])


def test_normal_from_whole_keeps_the_whole_images_normal_and_the_lesion_models_ratio():
    lesion = np.array([[0.6, 0.1, 0.3], [0.0, 0.5, 0.5]])
    whole = np.array([[0.2, 0.4, 0.4], [0.9, 0.05, 0.05]])
    out = normal_from_whole(lesion, whole)
    np.testing.assert_allclose(out, [[0.2, 0.2, 0.6], [0.9, 0.05, 0.05]])
    np.testing.assert_allclose(out.sum(1), 1.0)
    np.testing.assert_allclose(normal_from_whole(lesion[:, 1:], whole[:, 1:],
                                                 ["benign", "malignant"]), lesion[:, 1:])
    with pytest.raises(ValueError):
        normal_from_whole(lesion, whole[:1])


@pytest.mark.parametrize("pair, mode", [({"whole_image_model": "w"}, "lesion-context"),
                                        ({**PAIR, "outline_model": "../up"}, "lesion-context"),
                                        ({**PAIR, "outline_model": ".."}, "lesion-context"),
                                        (PAIR, "full")])
def test_a_card_refuses_a_broken_pair(pair, mode):
    with pytest.raises(ModelError, match="two_stage"):
        ModelCard.from_dict({"name": "x", "arch": "densenet121", "input_mode": mode,
                             "two_stage": pair})


def test_missing_pair_model_is_named(models, tmp_path):
    lonely = copy_model(models / "lesion", tmp_path / "lesion")
    with pytest.raises(ModelError, match="whole image model 'whole'"):
        _predictor(lonely)


def test_outlined_image_takes_normal_from_the_whole_image_and_the_rest_from_the_lesion(
        models, blobs):
    two, alone, whole = (_predictor(models / n) for n in ("lesion", "alone", "whole"))
    assert two.two_stage and not alone.two_stage
    assert two.reads_masks and alone.reads_masks and not whole.reads_masks
    image = _image()
    prediction = two.predict(image)
    assert prediction.outline is not None and prediction.outline.any()
    assert "outline suggested by tiny-seg" in prediction.reading
    expected = normal_from_whole(_probs(alone.predict(image, [prediction.outline]))[None],
                                 _probs(whole.predict(image))[None])[0]
    np.testing.assert_allclose(_probs(prediction), expected, atol=1e-6)
    assert prediction.model == "tiny-lesion" and prediction.read_by == ""
    assert prediction.malignant_threshold == 0.3
    assert two.explain(prediction).shape == prediction.model_view.shape[:2]
    given = two.predict(image, [prediction.outline])  # the same outline, given
    assert given.outline is None and "suggested" not in given.reading
    np.testing.assert_allclose(_probs(given), expected, atol=1e-6)


def test_without_an_outline_the_whole_image_model_reads(models, blobs):
    two, whole = _predictor(models / "lesion"), _predictor(models / "whole")
    for prediction, image in ((two.predict(_image(white_corner=True)), _image(True)),
                              (two.predict(_image(), suggest=False), _image()),
                              (two.predict(_image(), [np.zeros((72, 88), bool)],
                                           suggest=False), _image())):
        np.testing.assert_allclose(_probs(prediction), _probs(whole.predict(image)), atol=1e-6)
        assert prediction.read_by == "tiny-whole" and prediction.outline is None
        assert prediction.model == "tiny-lesion" and "tiny-whole" in prediction.reading
        cam = two.explain(prediction)  # the whole-image model's CAM over the whole image
        assert cam.shape == prediction.model_view.shape[:2] == (32, 32)
    with pytest.raises(ModelError, match="one by one"):
        two.predict_batch(prediction.tensor[None])


def test_evaluate_reads_two_stage_cards_like_the_predictor(models, busi_dir):
    records = load_records(busi_dir)
    loaded = load_model(models / "lesion")
    result = evaluate(loaded, records, device="cpu-fp32", backend="torch")
    alone = evaluate(load_model(models / "alone"), records, device="cpu-fp32", backend="torch")
    whole = evaluate(load_model(models / "whole"), records, device="cpu-fp32", backend="torch")
    lesion = np.array([r.label != "normal" for r in records])  # normals: empty mask files
    np.testing.assert_allclose(result.probs[~lesion], whole.probs[~lesion], atol=1e-6)
    np.testing.assert_allclose(result.probs[lesion],
                               normal_from_whole(alone.probs, whole.probs)[lesion], atol=1e-6)
    assert result.metrics["model"] == "tiny-lesion" and "tiny-whole" in result.metrics["reading"]
    assert result.metrics["at_threshold"]["threshold"] == 0.3
    # the intervals are those of the two-stage reading's probabilities
    reading = score(result.y_true, result.probs, threshold=0.3)
    assert result.metrics["auc_malignant_ci95"] == reading["auc_malignant_ci95"]
    assert result.metrics["at_threshold"]["sensitivity_ci95"] == \
        reading["at_threshold"]["sensitivity_ci95"]
    # with an input mode, the lesion model alone
    only = evaluate(loaded, records, device="cpu-fp32", backend="torch",
                    input_mode="lesion-context")
    np.testing.assert_allclose(only.probs, alone.probs, atol=1e-6)
    # the predictor gives the same figures for a lesion image with its expert mask
    record = next(r for r in records if r.label == "malignant")
    from bus_core.data.images import load_image, load_mask
    from bus_core.inference.predict import explain_record

    image = load_image(record.path)
    two = _predictor(models / "lesion")
    prediction = two.predict(image, [load_mask(record.masks[0])])
    np.testing.assert_allclose(_probs(prediction), result.probs[records.index(record)],
                               atol=1e-5)
    # the gallery's CAM of a lesion-free image is the whole-image model's, as its reading was
    normal = next(r for r in records if r.label == "normal")
    _, cam = explain_record(two, normal, result.probs[records.index(normal)], "normal")
    reference = two.whole.predict(load_image(normal.path))
    np.testing.assert_allclose(cam, two.whole.explain(reference, "normal"), atol=1e-5)


def test_batch_prediction_of_a_two_stage_model_equals_predict(models, blobs, busi_dir,
                                                              tmp_path):
    two = _predictor(models / "lesion")
    files = sorted((busi_dir / "benign").glob("benign (?).png"))[:3]
    out = tmp_path / "results.csv"
    report = predict_to_csv(files, out, two, workers=0)
    assert report.predicted == 3 and report.errors == 0
    rows = list(csv.DictReader(out.open()))
    from bus_core.data.images import load_image

    for row, file in zip(rows, files):
        expected = two.predict(load_image(file)).probabilities
        assert all(abs(float(row[f"p_{c}"]) - expected[c]) < 1e-5 for c in CLASSES)
        assert row["model"] == "tiny-lesion"


def test_command_line_scores_a_two_stage_model_on_suggested_outlines(models, blobs, busi_dir,
                                                                     tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["evaluate", "--model", str(models / "lesion"), "--data", str(busi_dir),
                 "--json", str(out), "--device", "cpu-fp32", "--backend", "torch"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["data"]["masks"] == "automatic" and metrics["outlined"] == 18
    assert "reading: " in capsys.readouterr().out
    image = tmp_path / "scan.png"
    from PIL import Image

    Image.fromarray(_image()).save(image)
    assert main(["predict", str(image), "--model", str(models / "lesion"), "--json",
                 "--device", "cpu-fp32", "--backend", "torch"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert "outline suggested by tiny-seg" in printed["reading"]


def test_report_command_writes_a_study_pdf_without_file_names_unless_asked(models, blobs,
                                                                          tmp_path, capsys):
    import pypdfium2 as pdfium
    from PIL import Image

    paths = []
    for i, corner in enumerate((False, True)):  # the second image: no outline found
        paths.append(tmp_path / f"Doe_Jane_view{i}.png")
        Image.fromarray(_image(white_corner=corner)).save(paths[-1])

    def text(pdf: Path) -> str:
        doc = pdfium.PdfDocument(pdf)
        try:
            return " ".join(" ".join(page.get_textpage().get_text_range() for page in doc).split())
        finally:
            doc.close()

    out = tmp_path / "study.pdf"
    assert main(["report", *map(str, paths), "--out", str(out), "--model",
                 str(models / "lesion"), "--device", "cpu-fp32", "--backend", "torch"]) == 0
    assert "Report of 2 images (study reading" in capsys.readouterr().out
    printed = text(out)
    assert "Study reading:" in printed and "Rule: the probabilities of its image" in printed
    assert "Lesion mask: suggested automatically by the outline model" in printed
    assert "Lesion mask: none" in printed
    assert "Doe" not in printed and "Case" not in printed
    assert main(["report", str(paths[0]), "--out", str(out), "--model", str(models / "lesion"),
                 "--device", "cpu-fp32", "--backend", "torch", "--file-names", "--name",
                 "Case 7"]) == 0
    printed = text(out)
    assert "Image 1: Doe_Jane_view0.png" in printed and "Case 7 |" in printed
    assert "Study reading" not in printed


@pytest.mark.slow
def test_fine_tuning_a_two_stage_model_keeps_its_pair(models, busi_dir, tmp_path):
    from bus_core.training.train import TrainConfig, train

    common = {"data": [str(busi_dir)], "init": str(models / "lesion"),
              "input_mode": "lesion-context", "fit": "pad", "resize": 40, "crop": 32,
              "crop_margin": 0.5, "batch_size": 4, "epochs": 1, "device": "cpu-fp32",
              "workers": 0, "checkpoint_every": 0}
    card = train(TrainConfig(out=str(models / "fine"), **common)).card
    assert card.two_stage == PAIR
    alone = card.metrics["lesion_model_alone"]
    assert set(alone) == {"val", "test", "malignant_threshold"}
    assert card.metrics["val"]["at_threshold"]["threshold"] == card.malignant_threshold
    assert "tiny-whole" in card.metrics["val"]["reading"]
    assert load_model(models / "fine").card.two_stage == PAIR  # saved as such
    # where the pair cannot be found from the new model's folder, the model reads alone
    lonely = train(TrainConfig(out=str(tmp_path / "lonely"), **common)).card
    assert lonely.two_stage == {} and "lesion_model_alone" not in lonely.metrics


def test_normal_odds_scale_the_odds_of_normal_and_keep_the_lesion_ratio():
    lesion = np.array([[0.1, 0.6, 0.3]])
    whole = np.array([[0.8, 0.1, 0.1]])
    out = normal_from_whole(lesion, whole, normal_odds=0.25)
    assert out[0, 0] == pytest.approx(0.25 * 4 / (0.25 * 4 + 1))  # odds 4 -> 1: P 0.5
    assert out[0, 1] / out[0, 2] == pytest.approx(2.0) and out.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(normal_from_whole(lesion, whole, normal_odds=1.0),
                               normal_from_whole(lesion, whole))


def test_fit_normal_odds_is_the_largest_factor_that_keeps_lesions_out_of_normal():
    y = np.array([1, 1, 2, 0])  # three lesions and a normal
    lesion = np.tile([0.0, 0.5, 0.5], (4, 1))
    whole = np.array([[0.9, 0.05, 0.05], [0.2, 0.4, 0.4], [0.6, 0.2, 0.2], [0.95, 0.03, 0.02]])
    outlined = [True, True, True, False]
    odds = fit_normal_odds(y, lesion, whole, outlined, target=1.0)
    called = normal_from_whole(lesion, whole, normal_odds=odds)[:3].argmax(1)
    assert (called != 0).all()  # every lesion read as a lesion with the factor
    bigger = NORMAL_ODDS_GRID[list(NORMAL_ODDS_GRID).index(odds) - 1]
    assert (normal_from_whole(lesion, whole, normal_odds=bigger)[:3].argmax(1) == 0).any()
    assert fit_normal_odds(y, lesion, whole, outlined, target=1 / 3) == 1.0  # met already
    assert fit_normal_odds(np.zeros(4, int), lesion, whole, outlined) == 1.0  # no lesions
    with pytest.raises(ModelError, match="normal_odds_with_outline"):
        ModelCard.from_dict({"name": "x", "arch": "densenet121", "normal_odds_with_outline": 0})


def test_the_cards_normal_odds_reach_the_predictor_and_evaluate(models, blobs, busi_dir,
                                                               tmp_path):
    odds = copy_model(models / "lesion", tmp_path / "lesion", normal_odds_with_outline=0.1)
    for name in ("whole", "outline"):
        copy_model(models / name, tmp_path / name)
    image = _image()
    plain, scaled = _predictor(models / "lesion").predict(image), _predictor(odds).predict(image)
    np.testing.assert_allclose(
        _probs(scaled), normal_from_whole(_probs(plain)[None], _probs(plain)[None],
                                          normal_odds=0.1)[0], atol=1e-6)
    records = load_records(busi_dir)
    result = evaluate(load_model(odds), records, device="cpu-fp32", backend="torch")
    assert result.metrics["normal_odds_with_outline"] == 0.1
    assert 0 < result.metrics["fitted_normal_odds"] <= 1


def test_the_map_for_normal_explains_the_whole_image_model_and_the_rest_the_lesion_model(
        models, blobs):
    two = _predictor(models / "lesion")
    image = _image()
    prediction = two.predict(image)
    assert prediction.whole is not None and prediction.read_by == ""
    whole = prediction.explained_by("normal")
    assert whole is prediction.whole and prediction.explained_by("benign") is prediction
    np.testing.assert_allclose(two.explain(prediction, "normal"),
                               two.whole.explain(prediction.whole, "normal"), atol=1e-6)
    np.testing.assert_allclose(whole.model_view, two.whole.predict(image).model_view)
    lesion_map = two.explain(prediction, "benign")
    assert lesion_map.shape == prediction.model_view.shape[:2]


def test_an_outline_read_as_normal_is_flagged_as_uncertain_and_counted(models, blobs,
                                                                       monkeypatch):
    from bus_core.metrics import OUTLINE_CONTRADICTION

    two = _predictor(models / "lesion")
    sure_normal = np.array([[0.97, 0.02, 0.01]])
    monkeypatch.setattr(two.whole, "predict_batch", lambda batch, warnings=None: [
        two.whole._prediction(sure_normal[0], batch[0], [], None)])
    prediction = two.predict(_image())
    assert prediction.outline is not None and prediction.label == "normal"
    assert prediction.uncertain and OUTLINE_CONTRADICTION in prediction.warnings
    y = [0, 1]
    lesion = _evaluation_of([[0.1, 0.6, 0.3], [0.1, 0.6, 0.3]], y)
    whole = _evaluation_of([[0.9, 0.05, 0.05], [0.2, 0.4, 0.4]], y)
    result = two_stage(lesion, whole, [True, True], normal_from_whole=True)
    assert result.metrics["outlined_but_normal"] == 1


def _evaluation_of(probs, y):
    return Evaluation({}, [str(i) for i in range(len(y))], np.asarray(y), np.asarray(probs),
                      np.zeros((len(y), 3)), list(CLASSES))


def test_side_by_side_and_the_shared_square_read_as_one_at_a_time(models, tmp_path):
    square = copy_model(models / "whole", tmp_path / "whole",
                        input_size={"resize": 64, "crop": 64, "fit": "pad"})
    copy_model(models / "outline", tmp_path / "outline")
    lesion = copy_model(models / "lesion", tmp_path / "lesion")
    assert square.is_dir()  # beside the lesion model, which names it
    image = _image()
    readings = {}
    for side_by_side in (True, False):
        for shared in (True, False):
            predictor = Predictor(load_model(lesion), "cpu-fp32", backend="torch",
                                  side_by_side=side_by_side)
            assert predictor.shared_square  # the whole-image model takes the 64 px square
            assert predictor.side_by_side == side_by_side
            predictor.shared_square = shared
            prediction = predictor.predict(image)
            assert {"whole", "outline"} <= set(prediction.stages_ms)
            readings[side_by_side, shared] = (_probs(prediction),
                                              prediction.outline, prediction.reading)
    first = readings[False, False]
    for probs, outline, reading in readings.values():
        np.testing.assert_allclose(probs, first[0], atol=1e-6)
        np.testing.assert_array_equal(outline, first[1])
        assert reading == first[2]


@pytest.fixture(scope="module")
def shared(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights folder whose lesion model ('lesion') pairs a whole-image model ('whole', the
    64 px padded square) with an outline model trained on its encoder, frozen ('outline'), and
    'claims': an outline model that says so but has an encoder of its own."""
    import torch

    from bus_core.models.build import save_model
    from bus_core.models.unet import DenseNetUNet

    root = tmp_path_factory.mktemp("shared")
    whole = copy_model(models / "whole", root / "whole",
                       input_size={"resize": 64, "crop": 64, "fit": "pad"})
    copy_model(models / "lesion", root / "lesion")
    outline = load_model(models / "outline")
    torch.manual_seed(1)
    net = DenseNetUNet()
    net.decoder.load_state_dict(outline.model.decoder.state_dict())
    card = outline.card
    card.init, card.hyperparameters = str(root / "tiny-whole"), {"freeze_encoder": True}
    save_model(net, card, root / "claims")
    net.features.load_state_dict(load_model(whole).model.features.state_dict())
    save_model(net, card, root / "outline")
    return root


def test_an_outline_model_on_the_whole_image_models_encoder_reads_in_one_pass(shared, tmp_path):
    from bus_core.inference.predict import network_count

    lesion = load_model(shared / "lesion")
    assert network_count(lesion.path, lesion.card) == 2
    ready: list[str] = []
    one_pass = Predictor(lesion, "cpu-fp32", backend="torch", on_network=ready.append)
    assert one_pass.first_stage is not None and ready == ["tiny-lesion", "tiny-whole"]
    # the same pair read as two networks: the outline model without the claim
    folder = tmp_path / "apart"
    for name in ("whole", "lesion"):
        copy_model(shared / name, folder / name)
    copy_model(shared / "outline", folder / "outline", hyperparameters={})
    apart = _predictor(folder / "lesion")
    assert apart.first_stage is None and network_count(folder / "lesion", apart.card) == 3
    image = _image()
    for masks in ([], [np.ones(image.shape[:2], bool)]):
        a, b = one_pass.predict(image, masks), apart.predict(image, masks)
        np.testing.assert_allclose(_probs(a), _probs(b), atol=1e-6)
        assert (a.outline is None) == (b.outline is None) and a.reading == b.reading
        if a.outline is not None:
            np.testing.assert_array_equal(a.outline, b.outline)
        assert set(a.stages_ms) <= {"first_stage", "lesion"}
    np.testing.assert_array_equal(one_pass.outliner.segment(image), apart.outliner.segment(image))


def test_an_outline_model_whose_encoder_is_not_the_one_it_names_is_refused(shared, tmp_path):
    folder = tmp_path / "pair"
    for name in ("whole", "lesion"):
        copy_model(shared / name, folder / name)
    copy_model(shared / "claims", folder / "outline")
    with pytest.raises(ModelError, match="encoders differ"):
        _predictor(folder / "lesion")


@pytest.mark.slow
def test_the_shared_first_stage_on_openvino_agrees_with_pytorch(shared):
    pytest.importorskip("openvino")
    image = _image()
    lesion = load_model(shared / "lesion")
    converted = Predictor(lesion, "cpu-fp32", backend="openvino")
    assert converted.first_stage is not None
    assert converted.first_stage.description.startswith("OpenVINO")
    torch_reading = _predictor(shared / "lesion").predict(image)
    reading = converted.predict(image)
    np.testing.assert_allclose(_probs(reading), _probs(torch_reading), atol=0.02)
    assert (reading.whole or reading).activations is not None  # the CAM from the same pass
