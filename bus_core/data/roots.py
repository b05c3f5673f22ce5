"""The folders the app may read data from: data folders, CSV manifests and split files typed
on the Train, Evaluate, Teaching and Review pages must lie under one of them.

An administrator lists them in $BUS_DATA_ROOTS (folders separated by `os.pathsep`: ':' on Linux
and macOS, ';' on Windows). Without it they are the project's splits/, ../shared/data beside the
project when it exists, the Teaching dataset folder ($BUS_DATASET) when it exists, and the user's
data folder ($BUS_DATA_DIR). A manifest may name only files in its own folder and below, and a
data folder may hold no symbolic link that leads out of it.

The refusals never say whether a path exists, so the app cannot be used to probe the server's
disks. The command line is not restricted: whoever has a shell on the machine can read those
files already.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from bus_core.data.dataset import manifest_paths
from bus_core.errors import PathNotAllowedError
from bus_core.settings import PROJECT_ROOT, data_dir, default_dataset_dir

DATA_ROOTS_ENV = "BUS_DATA_ROOTS"
OUTSIDE_ROOTS = ("This path is outside the folders the administrator allows for data. Ask them "
                 f"to add its folder to {DATA_ROOTS_ENV}.")


def data_roots() -> list[Path]:
    """The allowed folders, resolved: $BUS_DATA_ROOTS, or the defaults of the module's
    docstring."""
    listed = os.environ.get(DATA_ROOTS_ENV, "")
    if listed.strip():
        roots = [Path(p.strip()).expanduser() for p in listed.split(os.pathsep) if p.strip()]
    else:
        shared = PROJECT_ROOT.parent / "shared" / "data"
        dataset = default_dataset_dir()
        roots = [PROJECT_ROOT / "splits", *([shared] if shared.is_dir() else []),
                 *([dataset] if dataset else []), data_dir()]
    return [root.resolve() for root in roots]


def _resolved_within(path: Path, folders: list[Path]) -> Path | None:
    """`path` with symbolic links and '..' resolved if that lies in one of `folders`, else
    None (also for a path that cannot be resolved, such as a symbolic link loop)."""
    try:
        resolved = path.expanduser().resolve()
    except (OSError, RuntimeError):
        return None
    return resolved if any(resolved.is_relative_to(f) for f in folders) else None


def check_allowed(path: str | Path) -> Path:
    """`path` resolved (symbolic links and '..' included); PathNotAllowedError when it lies
    outside the allowed folders."""
    resolved = _resolved_within(Path(path), data_roots())
    if resolved is None:
        raise PathNotAllowedError(OUTSIDE_ROOTS)
    return resolved


def is_allowed(path: str | Path) -> bool:
    """Whether `check_allowed` accepts `path`."""
    return _resolved_within(Path(path), data_roots()) is not None


def _links(folder: Path) -> Iterator[Path]:
    """The symbolic links in `folder` and its subfolders (linked folders are not entered)."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_symlink():
                yield Path(entry.path)
            elif entry.is_dir():
                yield from _links(Path(entry.path))


def check_data_source(path: str | Path) -> Path:
    """A data folder or CSV manifest, resolved, as `check_allowed`; a manifest that names an
    image or mask outside its own folder, or a folder holding a symbolic link that leads out of
    it, raises PathNotAllowedError (naming the line or the link, not where it leads). Other
    problems of the data are left to `dataset.load_records`."""
    resolved = check_allowed(path)
    if resolved.is_dir():
        for link in _links(resolved):
            if _resolved_within(link, [resolved]) is None:
                raise PathNotAllowedError(
                    f"'{link.relative_to(resolved)}' in this folder is a link to a place "
                    "outside it: the app reads only files in a data folder and below.")
    if resolved.suffix.lower() == ".csv" and resolved.is_file():
        for line, written in manifest_paths(resolved):
            if _resolved_within(resolved.parent / written, [resolved.parent]) is None:
                raise PathNotAllowedError(
                    f"Line {line} of this manifest names a file outside the manifest's folder: "
                    "the app reads only files in a manifest's own folder and below.")
    return resolved


DEFAULT_SPLIT = PROJECT_ROOT / "splits" / "busi.json"
"""The committed split of BUSI: the split file offered where none is named after the data."""


def split_files() -> list[Path]:
    """Split files in the project's splits/ and in the user's data folder (where allowed)."""
    found: list[Path] = []
    for root in (PROJECT_ROOT / "splits", data_dir() / "splits"):
        if is_allowed(root) and root.is_dir():
            found += sorted(root.glob("*.json"))
    return found


def matching_split(sources: Sequence[str | Path]) -> Path | None:
    """The split file named after the single data folder (e.g. splits/busi.json for .../BUSI);
    None when there is none."""
    if len(sources) != 1:
        return None
    stem = Path(sources[0]).stem.lower()
    return next((path for path in split_files() if path.stem.lower() == stem), None)


def default_split(sources: Sequence[str | Path] = ()) -> Path:
    """The split file to offer for `sources`: the one named after them, else `DEFAULT_SPLIT`."""
    return matching_split(sources) or DEFAULT_SPLIT
