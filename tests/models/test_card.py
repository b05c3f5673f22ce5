import json

import pytest
import torch

from bus_core.errors import ModelError
from bus_core.models.build import build_model, save_model
from bus_core.models.card import new_card, read_card
from tests.conftest import ADMIN


def test_read_card_without_weights_loading(tiny_model_dir):
    card = read_card(tiny_model_dir / "card.json")
    assert card.name == "tiny-test" and card.size.crop == 32


def test_card_records_the_software_versions(tmp_path):
    import torchvision

    card = new_card("m", "densenet121")
    assert card.software == {"torch": torch.__version__, "torchvision": torchvision.__version__}
    folder = save_model(build_model("densenet121"), card, tmp_path / "m")
    assert read_card(folder).software["torch"] == torch.__version__


@pytest.mark.parametrize("change, message", [
    ({"card_version": 99}, "reads versions up to"),
    ({"normalisation": {"mean": [0.5] * 3, "std": [0.5] * 3}}, "normalises inputs with ImageNet"),
])
def test_cards_the_app_cannot_honour_are_refused(tiny_model_dir, tmp_path, change, message):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, folder)
    card = json.loads((folder / "card.json").read_text())
    card.update(change)
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match=message):
        read_card(folder)


HOSTILE_CARDS = [
    ({"input_size": {"resize": 100000, "crop": 100000}}, "input_size"),
    ({"input_size": {"resize": 0, "crop": 0}}, "input_size"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": "abc"}, "temperature"),
    ({"input_mode": "banana"}, "input mode"),
    ({"metrics": []}, "'metrics'"),
    ({"metrics": {"test": [1, 2]}}, "'metrics'"),
    ({"created": 5}, "'created'"),
    ({"classes": ["benign", "benign", "malignant"]}, "different names"),
    ({"classes": ["dog", "cat", "bird"]}, "are not two or more"),
    ({"task": "detection"}, "task"),
    ({"uncertain_below": True}, "uncertain_below"),
    ({"malignant_threshold": 3}, "malignant_threshold"),
]


@pytest.mark.parametrize("change, message", HOSTILE_CARDS)
def test_hostile_cards_are_refused_on_load_and_import(tiny_model_dir, tmp_path, change, message):
    from bus_core.models.registry import import_model
    from tests.conftest import copy_model

    folder = copy_model(tiny_model_dir, tmp_path / "bad", **change)
    with pytest.raises(ModelError, match="not valid") as refused:
        read_card(folder)
    assert message in str(refused.value)
    files = {name: (folder / name).read_bytes() for name in ("card.json", "model.safetensors")}
    with pytest.raises(ModelError, match="not valid"):
        import_model(files, user_dir=tmp_path / "models", who=ADMIN)
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())
