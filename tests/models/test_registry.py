import io
import json
import shutil
import struct
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from bus_core.errors import ModelError, StorageError
from bus_core.models import registry
from bus_core.models.build import load_model
from bus_core.models.card import CARD_FILE, WEIGHTS_FILE, read_card
from bus_core.models.registry import (
    MAX_CARD_BYTES,
    active_model_path,
    delete_model,
    export_model_zip,
    import_model,
    list_models,
    rename_model,
    set_active_model,
)
from bus_core.settings import user_models_dir
from tests.conftest import ADMIN


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("BUS_MODEL", raising=False)
    return tmp_path / "data"


@pytest.fixture
def user_model(data_dir, tiny_model_dir) -> Path:
    """A copy of the tiny model among the user's models."""
    return Path(shutil.copytree(tiny_model_dir, user_models_dir() / "tiny"))


@pytest.fixture
def bundled(tmp_path, tiny_model_dir) -> Path:
    """A bundled-weights folder holding one model."""
    root = tmp_path / "weights"
    shutil.copytree(tiny_model_dir, root / "release")
    return root


def files_of(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in (WEIGHTS_FILE, CARD_FILE)}


def zip_of(entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def test_rename_moves_folder_renames_card_and_keeps_it_active(user_model):
    set_active_model(user_model, who=ADMIN)
    new = rename_model(user_model, "my-model_v2", who=ADMIN)
    assert new == user_model.parent / "my-model_v2" and not user_model.exists()
    assert read_card(new).name == "my-model_v2"
    assert load_model(new).card.name == "my-model_v2"  # weights hash still matches
    assert active_model_path() == new.resolve()


@pytest.mark.parametrize("name", ["", "../escape", "a/b", "-starts-with-dash", "x" * 65])
def test_rename_refuses_bad_names(user_model, name):
    with pytest.raises(ModelError, match="cannot be a model name"):
        rename_model(user_model, name, who=ADMIN)
    assert user_model.is_dir()


def test_rename_refuses_an_existing_name(user_model):
    shutil.copytree(user_model, user_model.parent / "other")
    with pytest.raises(ModelError, match="already exists"):
        rename_model(user_model, "other", who=ADMIN)


def test_bundled_models_cannot_be_renamed_or_deleted(data_dir, bundled):
    release = bundled / "release"
    with pytest.raises(ModelError, match="bundled models cannot"):
        rename_model(release, "new", who=ADMIN)
    with pytest.raises(ModelError, match="bundled models cannot"):
        delete_model(release, who=ADMIN)
    assert (release / WEIGHTS_FILE).is_file()


def test_delete_removes_the_model_and_resets_the_active_one(user_model, bundled):
    set_active_model(user_model, who=ADMIN)
    delete_model(user_model, who=ADMIN)
    assert not user_model.exists()
    assert active_model_path(bundled) == bundled / "release"
    assert [e.path.name for e in list_models(bundled)] == ["release"]


def test_export_then_import_round_trip(user_model):
    data = export_model_zip(user_model)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert sorted(archive.namelist()) == [CARD_FILE, WEIGHTS_FILE]
    first = import_model({"tiny.zip": data}, who=ADMIN)
    second = import_model({"tiny.zip": data}, who=ADMIN)
    assert first.name == "tiny-test" and second.name == "tiny-test-2"  # named by the card
    assert load_model(second).card.name == "tiny-test-2"
    assert {e.path.name for e in list_models(Path("/nonexistent"))} == {"tiny", "tiny-test",
                                                                         "tiny-test-2"}


def test_import_two_files_and_a_zip_in_a_folder(data_dir, tiny_model_dir):
    files = files_of(tiny_model_dir)
    path = import_model({"weights.safetensors": files[WEIGHTS_FILE],
                         "card.json": files[CARD_FILE]}, who=ADMIN)
    assert path.parent == user_models_dir() and load_model(path).card.arch == "densenet121"
    nested = zip_of({f"export/{name}": data for name, data in files.items()})
    assert import_model({"export.zip": nested}, who=ADMIN).is_dir()


@pytest.mark.parametrize("name", ["model.pt", "model.pth", "model.pkl", "model.ckpt"])
def test_pickle_checkpoints_are_refused(data_dir, name):
    with pytest.raises(ModelError, match="can run arbitrary code"):
        import_model({name: b"\x80\x04not really a pickle"}, who=ADMIN)


def test_zips_with_pickles_or_extra_files_are_refused(data_dir, tiny_model_dir):
    files = files_of(tiny_model_dir)
    with pytest.raises(ModelError, match="can run arbitrary code"):
        import_model({"m.zip": zip_of({**files, "extra/model.pth": b"x"})}, who=ADMIN)
    with pytest.raises(ModelError, match="exactly two files"):
        import_model({"m.zip": zip_of({**files, "run.py": b"import os"})}, who=ADMIN)
    with pytest.raises(ModelError, match="exactly two files"):
        import_model({CARD_FILE: files[CARD_FILE]}, who=ADMIN)
    with pytest.raises(ModelError, match="not a readable zip"):
        import_model({"m.zip": b"garbage"}, who=ADMIN)


def test_a_zip_bomb_is_refused_before_it_is_unpacked(data_dir, tiny_model_dir):
    files = files_of(tiny_model_dir)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(CARD_FILE, files[CARD_FILE])
        with archive.open(WEIGHTS_FILE, "w", force_zip64=True) as member:
            for _ in range(256):
                member.write(bytes(1 << 20))
    bomb = buffer.getvalue()
    assert len(bomb) < (1 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(ModelError, match="claims to unpack to 268,435,456 bytes"):
            import_model({"bomb.zip": bomb}, who=ADMIN)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (16 << 20)
    assert not any(user_models_dir().glob("*/*"))


def test_each_file_of_an_upload_has_a_size_cap(data_dir, tiny_model_dir, monkeypatch):
    files = files_of(tiny_model_dir)
    big_card = files[CARD_FILE] + b" " * MAX_CARD_BYTES
    with pytest.raises(ModelError, match=f"larger than the {MAX_CARD_BYTES:,} bytes"):
        import_model({WEIGHTS_FILE: files[WEIGHTS_FILE], CARD_FILE: big_card}, who=ADMIN)
    with pytest.raises(ModelError, match=f"larger than the {MAX_CARD_BYTES:,} bytes"):
        import_model({"m.zip": zip_of({**files, CARD_FILE: big_card})}, who=ADMIN)
    monkeypatch.setattr(registry, "MAX_WEIGHTS_BYTES", len(files[WEIGHTS_FILE]) - 1)
    with pytest.raises(ModelError, match="model.safetensors is larger than"):
        import_model({"m.zip": zip_of(files)}, who=ADMIN)


def test_a_zip_that_understates_a_size_is_a_clear_error(data_dir, tiny_model_dir):
    files = files_of(tiny_model_dir)
    honest = zip_of(files, zipfile.ZIP_DEFLATED)
    true_size = struct.pack("<I", len(files[WEIGHTS_FILE]))
    assert honest.count(true_size) == 2  # the local and the central header
    lying = honest.replace(true_size, struct.pack("<I", 1000))
    with pytest.raises(ModelError, match="does not match the sizes its zip declares"):
        import_model({"m.zip": lying}, who=ADMIN)


def test_mismatched_card_and_weights_are_refused_and_nothing_is_kept(data_dir, tiny_model_dir):
    files = files_of(tiny_model_dir)
    card = json.loads(files[CARD_FILE])
    with pytest.raises(ModelError, match="do not match its model card"):
        import_model({WEIGHTS_FILE: files[WEIGHTS_FILE],
                      CARD_FILE: json.dumps({**card, "weights_sha256": "0" * 64}).encode()},
                     who=ADMIN)
    with pytest.raises(ModelError, match="the uploaded model are not those of the network its "
                                         r"card describes \(a resnet50") as refused:
        import_model({WEIGHTS_FILE: files[WEIGHTS_FILE],
                      CARD_FILE: json.dumps({**card, "arch": "resnet50"}).encode()}, who=ADMIN)
    message = str(refused.value)  # no temporary folder, no tensor counts
    assert ".upload-" not in message and "tensors" not in message
    with pytest.raises(ModelError, match="not a bus_core model card"):
        import_model({WEIGHTS_FILE: files[WEIGHTS_FILE], CARD_FILE: b"{not json"}, who=ADMIN)
    assert list(user_models_dir().iterdir()) == []


def test_unwritable_data_folder_is_a_clear_error(tmp_path, monkeypatch, tiny_model_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the data folder should be")
    monkeypatch.setenv("BUS_DATA_DIR", str(blocker))
    with pytest.raises(StorageError, match="Could not use the data folder"):
        set_active_model(tiny_model_dir, who=ADMIN)
    with pytest.raises(StorageError, match="Could not keep the uploaded model"):
        import_model(files_of(tiny_model_dir), who=ADMIN)
