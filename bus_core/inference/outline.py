"""The single path from an image to a suggested lesion outline, used by the CLI, the app and
the evaluation alike:

    image --transforms.fit_square--> square --model--> lesion probabilities
          --transforms.unfit_square--> map over the image's pixels --segmentation.postprocess-->
          HxW bool mask (all False: no lesion found)

A segmentation model is a folder like every model here (safetensors + card.json with task
"segmentation", arch "densenet121-unet", `input_size.crop` the square side and `postprocess`
the threshold, smallest component and hole filling chosen on validation).
"""

from __future__ import annotations

import dataclasses
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from bus_core import atomic
from bus_core.constants import IMAGE_SUFFIXES
from bus_core.data.augment import eval_batch
from bus_core.data.dataset import Record, load_records, mask_owner
from bus_core.data.images import load_image
from bus_core.data.inputs import record_lesion_mask
from bus_core.data.masks import outline_variant
from bus_core.data.presets import SquareFit, fit_square, unfit_square
from bus_core.errors import BusError, DataError, ModelError, storage
from bus_core.models.build import LoadedModel, load_model
from bus_core.models.registry import active_segmenter_path
from bus_core.models.unet import PostProcess, postprocess
from bus_core.runtime.backends import Forward, choose_forward
from bus_core.runtime.device import DeviceConfig, choose_device, prepare_model


class Segmenter:
    """A loaded segmentation model ready to outline lesions; safe to share between threads."""

    def __init__(self, loaded: LoadedModel, device: str | DeviceConfig = "cpu-fp32",
                 backend: str | None = None, forward: Forward | None = None) -> None:
        """`backend`: see `backends.choose_forward` (OpenVINO on CPUs where installed);
        `forward`: a forward pass already prepared for this model (a shared first stage's)."""
        if loaded.card.task != "segmentation":
            raise ModelError(f"{loaded.card.name} is a {loaded.card.task} model, not a "
                             "segmentation model.")
        self.loaded = loaded
        self.card = loaded.card
        self.device = device if isinstance(device, DeviceConfig) else choose_device(device)
        self.model = prepare_model(loaded.model, self.device)
        self.size = self.card.size.crop
        self.params = PostProcess(**self.card.postprocess)
        self.forward = forward or choose_forward(self.model, self.device, loaded.weights_id,
                                                 (self.size, self.size), backend)
        self._lock = threading.Lock()

    @classmethod
    def from_path(cls, path: str | Path | None = None, device: str | DeviceConfig = "cpu-fp32",
                  backend: str | None = None) -> Segmenter:
        """A segmenter for the model folder `path` (default: `registry.active_segmenter_path`)."""
        folder = path or active_segmenter_path()
        if folder is None:
            raise ModelError("No segmentation model is installed: pass one with --model or put "
                             "one in the weights/ folder.")
        return cls(load_model(folder), device, backend)

    def probabilities(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Lesion probability maps (HxW float32 in [0, 1]) over each RGB uint8 image's pixels."""
        squares, fits = zip(*(fit_square(image, self.size) for image in images))
        return self.square_probabilities(eval_batch(torch.from_numpy(np.stack(squares))), fits,
                                         [image.shape[:2] for image in images])

    def square_probabilities(self, batch: torch.Tensor, fits: Sequence[SquareFit],
                             shapes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """`probabilities` of images already fitted to the model's square (`fit_square`, then
        `augment.eval_batch`): `fits` and `shapes` (H, W) say where each came from."""
        with self._lock:
            logits = self.forward(batch)
        return self.logits_to_probabilities(logits, fits, shapes)

    @staticmethod
    def logits_to_probabilities(logits: np.ndarray, fits: Sequence[SquareFit],
                                shapes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """`square_probabilities` from the model's lesion logits (N x 1 x S x S)."""
        probs = (1 / (1 + np.exp(-logits[:, 0].astype(np.float64)))).astype(np.float32)
        return [unfit_square(p, fit, shape) for p, fit, shape in zip(probs, fits, shapes)]

    def logits_to_masks(self, logits: np.ndarray, fits: Sequence[SquareFit],
                        shapes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """`segment_squares` from the model's lesion logits (N x 1 x S x S)."""
        return self._masks(self.logits_to_probabilities(logits, fits, shapes))

    def _masks(self, probabilities: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Each probability map through this model's post-processing."""
        return [postprocess(p, self.params) for p in probabilities]

    def segment(self, image: np.ndarray) -> np.ndarray:
        """The suggested lesion mask of one RGB uint8 image (HxW bool; all False: none found)."""
        return postprocess(self.probabilities([image])[0], self.params)

    def segment_squares(self, batch: torch.Tensor, fits: Sequence[SquareFit],
                        shapes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """`segment` of images already fitted to the model's square (`square_probabilities`)."""
        return self._masks(self.square_probabilities(batch, fits, shapes))

    def segment_many(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """`segment` for several images in one batch."""
        return self._masks(self.probabilities(images))


@dataclass
class SegmentReport:
    """What `segment_inputs` did: masks written, how many of them empty, files skipped (name,
    reason)."""

    written: int = 0
    empty: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def list_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """The image files named by `inputs`: files as given, CSV manifests and BUSI-layout folders
    through `dataset.load_records`, other folders by their image files (masks left out)."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            try:
                paths += [r.path for r in load_records(path)]
            except DataError:
                paths += sorted(p for p in path.iterdir() if p.is_file()
                                and p.suffix.lower() in IMAGE_SUFFIXES
                                and not mask_owner(p.stem))
        elif path.suffix.lower() == ".csv":
            paths += [r.path for r in load_records(path)]
        else:
            paths.append(path)
    return paths


def write_mask_png(mask: np.ndarray, path: Path) -> None:
    """Save a bool mask as an 8-bit PNG of 0 / 255 (written whole or not at all)."""
    with storage(f"write the mask {path}"), atomic.atomic_path(path) as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(tmp, format="PNG")


def with_outline_variant(records: Sequence[Record], kind: str, mask_dir: Path | None = None
                         ) -> list[Record]:
    """The records with their masks replaced by outline variant `kind` of their combined
    (union) expert mask (`masks.outline_variant`, written to `mask_dir`, default a temporary
    folder); records without a lesion mask keep theirs."""
    with storage("create the folder for the outline variants"):
        folder = mask_dir or Path(tempfile.mkdtemp(prefix=f"bus-{kind}-masks-"))
        folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, record in enumerate(records):
        if not record.masks:
            out.append(record)
            continue
        shape = load_image(record.path).shape[:2]
        lesion = record_lesion_mask(record, shape)
        if not lesion.any():
            out.append(record)
            continue
        path = folder / f"{i:05d}_{kind}_mask.png"
        write_mask_png(outline_variant(lesion, kind), path)
        out.append(dataclasses.replace(record, masks=(path,)))
    return out


def segment_inputs(inputs: Sequence[str | Path], out: Path, segmenter: Segmenter, *,
                   progress: bool = False, batch_size: int = 8) -> SegmentReport:
    """Write `out/<image stem>_mask.png` for every image of `inputs`; unreadable files and
    repeated file names are reported in `skipped`, never abort the batch."""
    with storage(f"create the output folder {out}"):
        out.mkdir(parents=True, exist_ok=True)
    report = SegmentReport()
    paths, seen = [], set()
    for path in list_inputs(inputs):
        if path.stem in seen:
            report.skipped.append((path.name, "another input has the same file name; its mask "
                                   "would overwrite the first one"))
        else:
            seen.add(path.stem)
            paths.append(path)
    bar = tqdm(total=len(paths), disable=not progress, desc="segment", unit="img")
    for start in range(0, len(paths), batch_size):
        loaded = []
        for path in paths[start:start + batch_size]:
            try:
                loaded.append((path, load_image(path)))
            except BusError as exc:
                report.skipped.append((path.name, str(exc)))
            except OSError as exc:
                report.skipped.append((path.name, f"cannot be read ({exc.strerror or exc})"))
        if loaded:
            for (path, _), mask in zip(loaded, segmenter.segment_many([im for _, im in loaded])):
                write_mask_png(mask, out / f"{path.stem}_mask.png")
                report.written += 1
                report.empty += not mask.any()
        bar.update(len(paths[start:start + batch_size]))
    bar.close()
    return report


def with_automatic_masks(records: Sequence[Record], segmenter: Segmenter,
                         mask_dir: Path | None = None, *, progress: bool = False
                         ) -> list[Record]:
    """The records with their masks replaced by the segmenter's outlines (written to `mask_dir`,
    default a temporary folder); a record where no lesion is found gets no mask."""
    with storage("create the folder for the automatic masks"):
        folder = mask_dir or Path(tempfile.mkdtemp(prefix="bus-auto-masks-"))
        folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, record in enumerate(tqdm(records, disable=not progress, desc="outline", unit="img")):
        mask = segmenter.segment(load_image(record.path))
        path = folder / f"{i:05d}_mask.png"
        if mask.any():
            write_mask_png(mask, path)
        out.append(dataclasses.replace(record, masks=(path,) if mask.any() else ()))
    return out
