import json

import pytest
import torch

from bus_core.errors import ModelError
from bus_core.models.build import build_model, file_sha256, gradcam_layer, load_model, save_model
from bus_core.models.card import ARCHS, new_card


def test_densenet_state_dict_keys_are_torchvision_ones():
    model = build_model("densenet121")
    keys = set(model.state_dict())
    assert "features.norm5.weight" in keys and "classifier.weight" in keys
    assert model.classifier.out_features == 3


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_builds_with_three_outputs(arch):
    model = build_model(arch).eval()
    size = 75 if arch == "inception_v3" else 32
    with torch.inference_mode():
        out = model(torch.randn(1, 3, size, size))
    assert out.shape == (1, 3)
    assert isinstance(gradcam_layer(model, arch), torch.nn.Module)


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ModelError, match="Unknown architecture"):
        build_model("alexnet")


def test_imagenet_init_offline_says_what_happened(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr("torchvision.models._api.WeightsEnum.get_state_dict", no_network)
    with pytest.raises(ModelError, match="ImageNet weights for densenet121 could not be loaded"):
        build_model("densenet121", init="imagenet")


def test_save_load_round_trip_fp16(tmp_path):
    torch.manual_seed(0)
    model = build_model("densenet121").eval()
    folder = save_model(model, new_card("m", "densenet121"), tmp_path / "m", dtype=torch.float16)
    loaded = load_model(folder)
    assert loaded.card.weights_dtype == "float16"
    assert loaded.card.weights_sha256 == file_sha256(folder / "model.safetensors")
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(model(x), loaded.model(x), atol=1e-2)
    assert not loaded.model.training


def test_init_from_checkpoint_copies_weights(tmp_path):
    source = build_model("densenet121")
    folder = save_model(source, new_card("src", "densenet121"), tmp_path / "src")
    model = build_model("densenet121", init=folder)
    assert torch.equal(model.state_dict()["features.conv0.weight"],
                       source.state_dict()["features.conv0.weight"])
    with pytest.raises(ModelError, match="not a resnet50"):
        build_model("resnet50", init=folder)


def test_card_weights_mismatch_is_refused(tmp_path, tiny_model_dir):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(tiny_model_dir, folder)
    card = json.loads((folder / "card.json").read_text())
    card["weights_sha256"] = "0" * 64
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="do not match its model card"):
        load_model(folder)
    card = json.loads((tiny_model_dir / "card.json").read_text())
    card["classes"] = ["benign", "malignant"]
    (folder / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match=r"a densenet121 with 2 classes\): the card belongs"):
        load_model(folder)


def test_missing_and_unsafe_files_are_clear_errors(tmp_path, tiny_model_dir):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "card.json").write_text((tiny_model_dir / "card.json").read_text())
    with pytest.raises(ModelError, match="missing model.safetensors"):
        load_model(folder)
    # a pickle renamed to .safetensors is refused, never unpickled
    torch.save({"x": torch.zeros(1)}, folder / "model.safetensors")
    with pytest.raises(ModelError):
        load_model(folder, verify_hash=False)


def test_imagenet_cache_detection(tmp_path, monkeypatch):
    from torchvision import models as tvm

    from bus_core.models.build import imagenet_cached

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert not imagenet_cached("densenet121")
    url = tvm.get_model_weights("densenet121").DEFAULT.url
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / url.rsplit("/", 1)[-1]).write_bytes(b"")
    assert imagenet_cached("densenet121")


def test_weights_id_of_saved_and_unsaved_models(tiny_model_dir, tmp_path):
    import dataclasses

    from bus_core.models.build import LoadedModel

    loaded = load_model(tiny_model_dir)
    assert loaded.weights_id == loaded.card.weights_sha256
    unsaved = LoadedModel(loaded.model, dataclasses.replace(loaded.card, weights_sha256=""),
                          tmp_path / "not-saved-yet")
    assert len(unsaved.weights_id) == 64 and unsaved.weights_id == unsaved.weights_id
