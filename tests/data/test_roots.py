"""Paths typed in the app only under the folders the administrator allows (bus_core.data.roots),
with refusals that say nothing about the path. The pages' messages are tested with each page."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bus_core.data.roots import (
    DATA_ROOTS_ENV,
    DEFAULT_SPLIT,
    OUTSIDE_ROOTS,
    check_allowed,
    check_data_source,
    data_roots,
    default_split,
    is_allowed,
    matching_split,
)
from bus_core.errors import BusError, PathNotAllowedError
from bus_core.settings import PROJECT_ROOT
from ui.data_inputs import resolve_path, resolve_source, sources_from_text


@pytest.fixture
def roots(monkeypatch, tmp_path) -> tuple[Path, Path]:
    """An allowed folder `data` (with a file and a manifest folder) and a folder `outside`
    beside it that is not allowed, holding a 'secret' file."""
    data, outside = tmp_path / "data", tmp_path / "outside"
    (data / "set").mkdir(parents=True)
    (data / "set" / "a.png").write_bytes(b"png")
    outside.mkdir()
    (outside / "secret.txt").write_text("patient list")
    monkeypatch.setenv(DATA_ROOTS_ENV, os.pathsep.join(["", str(data), "  "]))
    return data, outside


def refusal(path: str | Path) -> str:
    with pytest.raises(PathNotAllowedError) as caught:
        check_allowed(path)
    return str(caught.value)


def test_the_roots_come_from_the_environment(roots):
    assert data_roots() == [roots[0].resolve()]


def test_default_roots_are_splits_shared_data_dataset_and_user_folder(monkeypatch, tmp_path):
    monkeypatch.delenv(DATA_ROOTS_ENV)
    monkeypatch.setenv("BUS_DATA_DIR", str(tmp_path / "userdata"))
    monkeypatch.setenv("BUS_DATASET", str(tmp_path))
    found = data_roots()
    assert found[0] == (PROJECT_ROOT / "splits").resolve()
    assert found[-2:] == [tmp_path.resolve(), (tmp_path / "userdata").resolve()]
    shared = PROJECT_ROOT.parent / "shared" / "data"
    assert (shared.resolve() in found) == shared.is_dir()
    assert is_allowed(PROJECT_ROOT / "splits" / "busi.json")
    assert not is_allowed(PROJECT_ROOT / "bus_core" / "settings.py")


def test_paths_inside_are_resolved(roots):
    data, _ = roots
    image = (data / "set" / "a.png").resolve()
    assert check_allowed(data / "set" / ".." / "set" / "a.png") == image
    assert check_allowed(data / "not-yet") == (data / "not-yet").resolve()


def test_climbing_out_absolute_paths_and_look_alike_folders_are_refused(roots, tmp_path):
    data, outside = roots
    (tmp_path / "data2").mkdir()
    hostile = [data / ".." / "outside" / "secret.txt", data / "set" / ".." / ".." / "outside",
               "/etc/passwd", tmp_path / "data2", tmp_path, "/"]
    for path in hostile:
        assert refusal(path) == OUTSIDE_ROOTS  # the same words, naming no path


def test_a_missing_path_outside_gets_the_same_message_as_an_existing_one(roots):
    _, outside = roots
    assert refusal(outside / "secret.txt") == refusal(outside / "no-such-file.txt") \
        == refusal("/no/such/folder/at/all") == OUTSIDE_ROOTS


def test_a_symbolic_link_out_of_a_root_is_refused(roots):
    data, outside = roots
    try:
        (data / "shortcut").symlink_to(outside, target_is_directory=True)
    except OSError:
        pytest.skip("symbolic links cannot be made here")
    assert refusal(data / "shortcut") == OUTSIDE_ROOTS
    assert refusal(data / "shortcut" / "secret.txt") == OUTSIDE_ROOTS


def write_manifest(folder: Path, *rows: str) -> Path:
    manifest = folder / "labels.csv"
    manifest.write_text("path,label,mask\n" + "".join(row + "\n" for row in rows))
    return manifest


def test_a_manifest_inside_its_folder_is_accepted(roots):
    data, _ = roots
    manifest = write_manifest(data, "set/a.png,benign,set/a.png", "set/missing.png,normal,")
    assert check_data_source(manifest) == manifest.resolve()
    assert check_data_source(data / "set") == (data / "set").resolve()  # a folder: no rows


@pytest.mark.parametrize("row", [
    "../../etc/passwd,benign,",
    "/etc/passwd,benign,",
    "set/a.png,benign,set/../../outside/secret.txt",
    "set/a.png,benign,set/a.png;..\\outside\\secret.txt",
])
def test_a_manifest_naming_files_outside_its_folder_is_refused(roots, row):
    data, _ = roots
    manifest = write_manifest(data, "set/a.png,normal,", row)
    with pytest.raises(PathNotAllowedError) as caught:
        check_data_source(manifest)
    message = str(caught.value)
    assert message.startswith("Line 3 of this manifest names a file outside")
    assert "passwd" not in message and "secret" not in message and ".." not in message


def test_a_manifest_row_linking_out_of_its_folder_is_refused(roots):
    data, outside = roots
    try:
        (data / "set" / "b.png").symlink_to(outside / "secret.txt")
    except OSError:
        pytest.skip("symbolic links cannot be made here")
    with pytest.raises(PathNotAllowedError):
        check_data_source(write_manifest(data, "set/b.png,benign,"))


def test_a_folder_holding_a_link_out_of_it_is_refused(roots):
    data, outside = roots
    (data / "set" / "benign").mkdir()
    try:
        (data / "set" / "benign" / "x.png").symlink_to(outside / "secret.txt")
        (data / "set" / "inner.png").symlink_to(data / "set" / "a.png")  # inside: fine
    except OSError:
        pytest.skip("symbolic links cannot be made here")
    with pytest.raises(PathNotAllowedError) as caught:
        check_data_source(data / "set")
    assert str(caught.value).startswith("'benign/x.png' in this folder is a link to a place")
    assert "secret" not in str(caught.value)
    (data / "set" / "benign" / "x.png").unlink()
    (data / "set" / "benign" / "y.png").symlink_to("../a.png")
    assert check_data_source(data / "set") == (data / "set").resolve()


def test_a_manifest_outside_the_roots_is_refused_before_it_is_read(roots):
    _, outside = roots
    manifest = write_manifest(outside, "../../etc/passwd,benign,")
    with pytest.raises(PathNotAllowedError) as caught:
        check_data_source(manifest)
    assert str(caught.value) == OUTSIDE_ROOTS


def test_typed_paths_of_the_pages(roots, monkeypatch):
    data, outside = roots
    assert sources_from_text(f"\n{data / 'set'}\n\n") == [str((data / "set").resolve())]
    assert resolve_source(f"  {data / 'set'}  ") == str((data / "set").resolve())
    with pytest.raises(PathNotAllowedError):
        sources_from_text(f"{data / 'set'}\n{outside}")
    with pytest.raises(PathNotAllowedError):
        resolve_path(str(outside / "secret.txt"))
    monkeypatch.setenv(DATA_ROOTS_ENV, str(PROJECT_ROOT / "splits"))
    assert resolve_path("splits/busi.json") == str((PROJECT_ROOT / "splits" / "busi.json")
                                                   .resolve())  # relative: from the project
    with pytest.raises(PathNotAllowedError):
        resolve_path("splits/../bus_core/settings.py")


def test_the_refusal_is_a_bus_error():
    assert issubclass(PathNotAllowedError, BusError)


def test_the_split_offered_is_the_one_named_after_the_data_else_busi(tmp_path):
    assert default_split() == DEFAULT_SPLIT == PROJECT_ROOT / "splits" / "busi.json"
    assert matching_split([tmp_path / "BUSI"]) == DEFAULT_SPLIT
    assert matching_split([tmp_path / "no-such-data"]) is None
    assert matching_split([tmp_path / "BUSI", tmp_path / "other"]) is None
    assert default_split([tmp_path / "no-such-data"]) == DEFAULT_SPLIT
