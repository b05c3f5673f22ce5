import numpy as np
import pytest

from bus_core.errors import InvalidImageError, MaskError, ModelError
from bus_core.inference.predict import Predictor, predict_file, scope_warnings
from bus_core.models.build import load_model
from tests.conftest import synthetic_image


@pytest.fixture(scope="module")
def predictor(tiny_model_dir):
    return Predictor(load_model(tiny_model_dir), device="cpu-fp32")


def test_prediction_is_a_calibrated_distribution(predictor):
    image, _ = synthetic_image("benign", np.random.default_rng(1), size=(200, 240))
    p = predictor.predict(image)
    assert set(p.probabilities) == {"normal", "benign", "malignant"}
    assert abs(sum(p.probabilities.values()) - 1) < 1e-5
    assert p.label == max(p.probabilities, key=p.probabilities.get)
    assert p.model_view.shape == (32, 32, 3)
    assert p.to_dict()["label"] == p.label


def test_temperature_flattens_probabilities(tiny_model_dir):
    image, _ = synthetic_image("malignant", np.random.default_rng(2), size=(200, 240))
    sharp = Predictor(load_model(tiny_model_dir), device="cpu-fp32")
    flat = Predictor(load_model(tiny_model_dir), device="cpu-fp32")
    flat.card.temperature = 100.0
    assert max(flat.predict(image).probabilities.values()) < \
        max(sharp.predict(image).probabilities.values()) or \
        max(sharp.predict(image).probabilities.values()) < 0.34
    assert max(flat.predict(image).probabilities.values()) < 0.34
    assert flat.predict(image).uncertain


def test_a_whole_image_model_ignores_the_masks_it_is_given(predictor):
    image, mask = synthetic_image("benign", np.random.default_rng(4), size=(200, 240))
    assert not predictor.reads_masks
    alone, given = predictor.predict(image), predictor.predict(image, [mask])
    assert given.probabilities == alone.probabilities and given.warnings == alone.warnings
    assert given.model_view.shape == alone.model_view.shape


def test_mask_model_needs_a_mask(tiny_model_dir):
    predictor = Predictor(load_model(tiny_model_dir), device="cpu-fp32")
    predictor.spec = predictor.spec.__class__(mode="mask", size=predictor.spec.size)
    image, mask = synthetic_image("benign", np.random.default_rng(3), size=(200, 240))
    assert predictor.reads_masks
    with pytest.raises(MaskError, match="lesion mask"):
        predictor.predict(image)
    with pytest.raises(MaskError):
        predictor.predict(image, [np.zeros_like(mask)])
    assert predictor.predict(image, [mask]).label


def test_predict_file_with_mask_files(tiny_model_dir, busi_dir):
    predictor = Predictor(load_model(tiny_model_dir), device="cpu-fp32")
    image = busi_dir / "benign" / "benign (1).png"
    p = predict_file(image, [busi_dir / "benign" / "benign (1)_mask.png"], predictor)
    assert p.label in predictor.classes


def test_no_model_installed_message(monkeypatch, tmp_path):
    monkeypatch.setattr("bus_core.inference.predict.active_model_path", lambda: None)
    with pytest.raises(ModelError, match="No model is installed"):
        Predictor.from_path()


def test_scope_warnings():
    gray = np.full((400, 500, 3), 90, np.uint8)
    assert scope_warnings(gray) == []
    doppler = gray.copy()
    doppler[100:140, 100:140] = (220, 30, 30)
    assert any("Colour overlay" in w for w in scope_warnings(doppler))
    photo = np.random.default_rng(0).integers(0, 255, (400, 500, 3), dtype=np.uint8)
    assert any("does not look like" in w for w in scope_warnings(photo))
    assert any("Unusual image size" in w for w in scope_warnings(gray[:50]))


def test_explain_record_uses_the_evaluation_input(tiny_model_dir, busi_dir):
    from bus_core.data.dataset import load_records
    from bus_core.inference.predict import Predictor, explain_record

    predictor = Predictor.from_path(tiny_model_dir, device="cpu-fp32")
    record = load_records(busi_dir)[0]
    seen, cam = explain_record(predictor, record, [0.2, 0.5, 0.3], "malignant")
    assert seen.shape == (32, 32, 3) and cam.shape == (32, 32)
    assert 0.0 <= cam.min() and cam.max() <= 1.0


def test_prediction_flags_malignant_above_the_card_threshold(tiny_model_dir):
    import numpy as np

    from bus_core.inference.predict import Predictor
    from bus_core.models.build import load_model

    loaded = load_model(tiny_model_dir)
    image = np.full((60, 80, 3), 90, np.uint8)
    assert Predictor(loaded, "cpu-fp32").predict(image).malignant_flag is None
    loaded.card.malignant_threshold = 0.0
    flagged = Predictor(loaded, "cpu-fp32").predict(image)
    assert flagged.malignant_flag is True and flagged.to_dict()["malignant_flag"] is True
    loaded.card.malignant_threshold = 1.01
    assert Predictor(loaded, "cpu-fp32").predict(image).malignant_flag is False


def test_a_one_pixel_image_is_refused_not_predicted(predictor):
    with pytest.raises(InvalidImageError, match="too small"):
        predictor.predict(np.zeros((1, 1, 3), np.uint8))
