"""Readings from the command line: `predict` (one image, or many into a CSV file), `report`
(a study's PDF), `segment`, `warm`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bus_core.cli.common import add_backend, write_output
from bus_core.data.images import image_to_png_bytes, load_image
from bus_core.errors import BusError
from bus_core.inference.batch import DEFAULT_BATCH_SIZE, list_items, predict_to_csv, write_studies
from bus_core.inference.cam import overlay
from bus_core.inference.outline import Segmenter, segment_inputs
from bus_core.inference.pdf_report import read_study, render_study_pdf
from bus_core.inference.predict import Predictor, predict_file
from bus_core.inference.study import DEFAULT_RULE, RULES
from bus_core.inference.warm import warm
from bus_core.models.registry import active_segmenter_path
from bus_core.runtime.device import DEVICE_CHOICES


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict one image (with optional masks) and optionally save a Grad-CAM overlay; with
    --out, every image of the inputs into a CSV file."""
    if args.out:
        return _predict_many(args)
    if len(args.inputs) != 1:
        raise BusError("Give one image, or --out results.csv to predict several (files, "
                       "folders, CSV manifests, DICOM series).")
    image_path = args.inputs[0]
    predictor = Predictor.from_path(args.model, device=args.device, backend=args.backend)
    mask_note = ""
    if predictor.spec.uses_masks and not args.mask and not predictor.two_stage:
        segmenter = Segmenter.from_path(args.segmenter)
        image = load_image(image_path)
        mask = segmenter.segment(image)
        if not mask.any():
            raise BusError(f"The outline model ({segmenter.card.name}) finds no lesion in this "
                           "image, and this model reads only the lesion: give a lesion mask "
                           "with --mask, or use a model that reads the whole image.")
        prediction = predictor.predict(image, [mask])
        mask_note = f"automatic outline by {segmenter.card.name}"
    else:
        prediction = predict_file(image_path, args.mask, predictor)
    out = prediction.to_dict()
    if mask_note:
        out["mask"] = mask_note
    if args.cam:
        heat = predictor.explain(prediction, target=args.target, method=args.cam_method)
        seen = prediction.explained_by(args.target or prediction.label).model_view
        write_output(args.cam, image_to_png_bytes(overlay(seen, heat)))
        out["cam"] = args.cam
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    flag = "  (uncertain)" if prediction.uncertain else ""
    print(f"{prediction.label}{flag}  [{prediction.model}]")
    if mask_note:
        print(f"  mask: {mask_note}")
    if prediction.reading:
        print(f"  {prediction.reading}")
    for name, p in prediction.probabilities.items():
        print(f"  {name:<10} {p:6.1%}")
    if prediction.malignant_flag:
        print(f"  flag: {prediction.flag_sentence()}")
    for warning in prediction.warnings:
        print(f"Warning: {warning}")
    return 0


def _predict_many(args: argparse.Namespace) -> int:
    """`predict INPUT ... --out results.csv` (see bus_core.inference.batch); prints a one-line
    summary."""
    single = [flag for flag, value in (("--mask", args.mask), ("--cam", args.cam),
                                       ("--json", args.json), ("--target", args.target)) if value]
    if single:
        raise BusError(f"{', '.join(single)} are for one image without --out; with --out, "
                       "lesion masks come from a CSV manifest's mask column.")
    predictor = Predictor.from_path(args.model, device=args.device, backend=args.backend)
    out = Path(args.out)
    report = predict_to_csv(args.inputs, out, predictor, batch_size=args.batch_size,
                            workers=args.workers, progress=sys.stderr.isatty())
    print(report.summary(out))
    items = list_items(args.inputs)
    if any(item.study for item in items):
        studies = out.with_name(f"{out.stem}-studies.csv")
        count = write_studies(items, out, studies, predictor)
        print(f"{count} studies (by the manifest's patient column) read as one each into "
              f"{studies}: {RULES[DEFAULT_RULE]}.")
    return 2 if report.predicted and report.errors == report.predicted else 0


def cmd_report(args: argparse.Namespace) -> int:
    """Read the images of one study and write its PDF report."""
    predictor = Predictor.from_path(args.model, device=args.device, backend=args.backend)
    images = [load_image(path) for path in args.images]
    names = [Path(path).name for path in args.images] if args.file_names else []
    report = read_study(predictor, images, names=names, name=args.name, rule=args.rule)
    write_output(args.out, render_study_pdf(report))
    reading = (f"study reading {report.combined_label}" if report.combined is not None
               else f"reading {report.images[0].label}")
    print(f"Report of {len(images)} image{'s' if len(images) > 1 else ''} ({reading}) written "
          f"to {args.out}.")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    """Write a suggested lesion mask (<stem>_mask.png, 0/255, the image's size) per image."""
    segmenter = Segmenter.from_path(args.model, device=args.device)
    report = segment_inputs(args.inputs, Path(args.out), segmenter,
                            progress=sys.stderr.isatty(), batch_size=args.batch_size)
    for name, problem in report.skipped:
        print(f"Skipped {name}: {problem}", file=sys.stderr)
    print(f"{report.written} masks written to {args.out} ({report.empty} with no lesion found); "
          f"{len(report.skipped)} files skipped.")
    return 0 if report.written or not report.skipped else 2


def cmd_warm(args: argparse.Namespace) -> int:
    """Prepare a model (default: the active one) and the active outline model for this
    computer, printing each network as it is ready, and what keeping the OpenVINO cache to the
    installed models removed."""
    start = time.perf_counter()
    warmup = warm(args.model, active_segmenter_path(), device=args.device,
                  backend=args.backend)
    progress = warmup.progress()
    print(f"Preparing {progress.model} for this computer ({progress.total} networks).",
          flush=True)
    while not warmup.done():
        progress = warmup.wait(progress)
        if progress.last and progress.state == "preparing":
            print(f"  {progress.done} of {progress.total} networks ready ({progress.last}).",
                  flush=True)
    prepared = warmup.result()
    print(f"Ready in {time.perf_counter() - start:.1f} s: {prepared.predictor.description}.")
    report = warmup.cache_report()
    if report is None:
        print("OpenVINO cache: not tidied (see the log).")
    else:
        removed = (f"; removed {len(report.removed)} entries no installed model needs "
                   f"({report.freed_bytes / 1e6:.1f} MB)" if report.removed else "")
        print(f"OpenVINO cache: {report.size_bytes / 1e6:.1f} MB{removed}.")
    return 0


def add_segment(sub: argparse._SubParsersAction) -> None:
    """The `segment` command's options."""
    p = sub.add_parser("segment", help="write a suggested lesion mask for each image")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image file, BUSI-layout (or flat) image folder, or CSV manifest")
    p.add_argument("--out", required=True, help="folder for the <image stem>_mask.png files")
    p.add_argument("--model", help="segmentation model folder (default: the bundled one)")
    p.add_argument("--device", default="cpu-fp32", choices=DEVICE_CHOICES)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_segment)


def add_predict(sub: argparse._SubParsersAction) -> None:
    """The `predict` command's options."""
    p = sub.add_parser("predict", help="classify one image, or many into a CSV file (--out)")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image file; with --out also several, folders (searched recursively), "
                        "CSV manifests and multi-frame DICOM files (one row per frame)")
    p.add_argument("--out", help="CSV file of results, one row per image; rows already in it "
                                 "are kept and their images skipped (resume)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="images per forward pass (--out)")
    p.add_argument("--workers", type=int,
                   help="processes that decode images (--out; default: CPU cores, at most 4; "
                        "0: decode in this process)")
    p.add_argument("--mask", action="append", default=[],
                   help="lesion mask file (repeatable); a lesion model without one uses the "
                        "automatic outline")
    p.add_argument("--segmenter", help="segmentation model for the automatic outline "
                                       "(default: the bundled one)")
    p.add_argument("--model", help="model folder (default: the active model)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--cam", help="save a Grad-CAM overlay PNG here")
    p.add_argument("--target", help="class to explain (default: the predicted one)")
    p.add_argument("--cam-method", default="gradcam", choices=("gradcam", "gradcam++"))
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    add_backend(p)
    p.set_defaults(func=cmd_predict)


def add_warm(sub: argparse._SubParsersAction) -> None:
    """The `warm` command's options."""
    p = sub.add_parser("warm", help="prepare the active model (or --model) for this computer "
                                    "before the first reading")
    p.add_argument("--model", help="model folder (default: the active model)")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    add_backend(p)
    p.set_defaults(func=cmd_warm)


def add_report(sub: argparse._SubParsersAction) -> None:
    """The `report` command's options."""
    p = sub.add_parser("report", help="the PDF report of one study (several images of it)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="the study's image files")
    p.add_argument("--out", required=True, help="PDF file to write")
    p.add_argument("--model", help="model folder (default: the active model)")
    p.add_argument("--rule", default=DEFAULT_RULE, choices=list(RULES),
                   help="how the images' readings make the study's: "
                        + "; ".join(f"{k}, {v}" for k, v in RULES.items())
                        + " (default: %(default)s)")
    p.add_argument("--name", default="",
                   help="the study's name in the report (default: none; no patient names "
                        "unless you choose to print one)")
    p.add_argument("--file-names", action="store_true",
                   help="print each image's file name (off by default: file names often "
                        "hold a patient's name)")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    add_backend(p)
    p.set_defaults(func=cmd_report)
