"""A compact training copy of data sets, for a training machine that can only be sent a little
data (e.g. a rented GPU): the same folders, file names and manifests, so the committed split
files apply unchanged, but every image scaled down to at most `--max-side` pixels and stored
as JPEG (the file keeps its name; images are read by content, not by extension) and every mask
as a 1-bit PNG of the same size.

    PYTHONPATH=. python recipes/compact_copy.py --data $DATA/BUSI --data $DATA/BUSBRA/labels.csv \
        --data $DATA/BUSUCLM/labels.csv --out compact --max-side 320 --quality 80

Models trained on the copy read full-size images later exactly as they read the copy: the
input is scaled to the model's input size (224 px or less) first.
"""

from __future__ import annotations

import argparse
import io
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image

from bus_core.data.dataset import load_records
from bus_core.data.images import load_image


def _scaled(image: Image.Image, max_side: int, resample: Image.Resampling) -> Image.Image:
    scale = max_side / max(image.size)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, resample)


def _copy(job: tuple[Path, Path, Path, tuple[Path, ...], int, int]) -> int:
    root, out, image_path, masks, max_side, quality = job
    pixels = load_image(image_path)
    image = Image.fromarray(pixels)
    if (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all():
        image = image.convert("L")
    small = _scaled(image, max_side, Image.Resampling.LANCZOS)
    target = out / image_path.relative_to(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=quality)
    target.write_bytes(buffer.getvalue())
    written = len(buffer.getvalue())
    for mask_path in masks:
        with Image.open(mask_path) as mask:
            binary = mask.convert("L").point(lambda v: 255 if v > 127 else 0)
        binary = binary.resize(small.size, Image.Resampling.NEAREST).convert("1")
        mask_target = out / mask_path.relative_to(root)
        mask_target.parent.mkdir(parents=True, exist_ok=True)
        binary.save(mask_target, format="PNG", optimize=True)
        written += mask_target.stat().st_size
    return written


def main() -> None:
    """Parse the arguments and write the copy."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", action="append", required=True,
                   help="BUSI-layout folder or CSV manifest (repeat)")
    p.add_argument("--out", required=True, help="folder of the copy (one subfolder per data set)")
    p.add_argument("--max-side", type=int, default=320)
    p.add_argument("--quality", type=int, default=80)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    jobs = []
    for source in args.data:
        path = Path(source).resolve()
        root = path.parent if path.is_file() else path
        out = Path(args.out) / root.name
        if path.is_file():
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out / path.name)
        jobs += [(root, out, r.path, r.masks, args.max_side, args.quality)
                 for r in load_records(path)]
    with ProcessPoolExecutor(args.workers) as pool:
        total = sum(pool.map(_copy, jobs, chunksize=16))
    print(f"{len(jobs)} images, {total / 2**20:.1f} MiB in {args.out}")


if __name__ == "__main__":
    main()
