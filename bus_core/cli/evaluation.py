"""Scoring models from the command line: `evaluate`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bus_core.cli.common import add_backend, add_data, write_output
from bus_core.constants import MALIGNANT
from bus_core.data.inputs import INPUT_MODES, InputSpec
from bus_core.data.masks import OUTLINE_VARIANTS
from bus_core.data.splits import EVALUATION_SUBSETS, select_records
from bus_core.errors import BusError
from bus_core.evaluation.evaluate import (
    EXPERT,
    OUTLINE_POLICIES,
    SERVED,
    default_policy,
    evaluate,
    evaluate_segmentation,
    outline_agreement,
    reads_outlines,
    served_segmenter,
    two_stage,
    with_policy_outlines,
)
from bus_core.inference.outline import Segmenter, with_automatic_masks, with_outline_variant
from bus_core.metrics import fit_malignant_threshold, format_metrics, format_segmentation
from bus_core.models.build import load_model
from bus_core.models.registry import active_model_path, no_model_message
from bus_core.runtime.device import DEVICE_CHOICES


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a model on data (optionally one subset of a split file)."""
    path = args.model or active_model_path()
    if path is None:
        raise BusError(no_model_message(command_line=True))
    loaded = load_model(path)
    if loaded.card.task == "segmentation":
        return _evaluate_segmenter(args, loaded)
    records, data = select_records(args.data, args.split, args.subset)
    reads_masks = reads_outlines(loaded.card)
    if (args.masks not in (None, "expert") or args.outline_check) and not reads_masks:
        raise BusError(f"--masks {args.masks} and --outline-check are for models that read a "
                       "lesion mask; this model uses the whole image.")
    if args.masks is None:
        args.masks = "auto" if default_policy(loaded.card, args.input_mode) == SERVED else "expert"
    if args.outline_check:
        return _outline_check(args, loaded, records, data)
    if args.whole_image_model:
        return _two_stage(args, loaded, records, data)
    if args.masks in ("auto", "expert"):
        records, kind = with_policy_outlines(
            loaded, records, SERVED if args.masks == "auto" else EXPERT,
            segmenter=args.segmenter, mask_dir=Path(args.mask_dir) if args.mask_dir else None,
            progress=sys.stderr.isatty())
        data = {**data, "masks": kind} if kind else data
    else:
        records = with_outline_variant(records, args.masks)
        data = {**data, "masks": f"{args.masks} expert outline"}
    result = evaluate(loaded, records, device=args.device, batch_size=args.batch_size,
                      progress=sys.stderr.isatty(), data={**data, "n": len(records)},
                      tta=args.tta, input_mode=args.input_mode, backend=args.backend)
    _given_threshold(args, result)
    policy = {"automatic": SERVED, "expert": EXPERT}.get(data.get("masks", ""))
    masks = f", scored {OUTLINE_POLICIES[policy]}" if policy else ""
    print(f"Model {result.metrics['model']} on {len(records)} images ({data['subset']}){masks}:")
    if result.metrics.get("reading"):
        print(f"  reading: {result.metrics['reading']}")
    print(format_metrics(result.metrics))
    _fitted_threshold(result)
    if args.json:
        out = {**result.metrics, "misclassified": [
            {"id": i, "true": t, "predicted": p, "probability": q}
            for i, t, p, q in result.misclassified()]}
        write_output(args.json, json.dumps(out, indent=2, allow_nan=False))
        print(f"Metrics written to {args.json}")
    return 0


def _evaluate_segmenter(args: argparse.Namespace, loaded) -> int:
    records, data = select_records(args.data, args.split, args.subset)
    result = evaluate_segmentation(Segmenter(loaded, args.device if args.device != "auto"
                                             else "cpu-fp32"), records,
                                   progress=sys.stderr.isatty(), data={**data, "n": len(records)})
    print(f"Segmentation model {result['model']} on {len(records)} images ({data['subset']}):")
    print(format_segmentation(result))
    if args.json:
        write_output(args.json, json.dumps(result, indent=2, allow_nan=False))
        print(f"Metrics written to {args.json}")
    return 0


def _given_threshold(args: argparse.Namespace, result: Any) -> None:
    """With --malignant-threshold T, `result`'s figures at the rule P(malignant) >= T in place
    of the card's."""
    if args.malignant_threshold is not None:
        result.rescore(args.malignant_threshold)


def _fitted_threshold(result: Any) -> None:
    """Store in `result.metrics` and print the sensitivity-first threshold these images give
    (`metrics.fit_malignant_threshold`): on a validation subset, the one to put in a card."""
    if MALIGNANT not in result.classes:
        return
    fitted = fit_malignant_threshold(result.y_true, result.probs, result.classes)
    result.metrics["fitted_threshold"] = fitted
    print(f"Sensitivity-first threshold fitted on these images: {fitted}")
    if "fitted_normal_odds" in result.metrics:
        print("Factor on P(normal)'s odds where an outline is found, fitted on these images "
              f"(at most 5% of lesions called normal): {result.metrics['fitted_normal_odds']}")


def _segmenter(args: argparse.Namespace, loaded: Any) -> Any:
    """The outline model for --masks auto: --segmenter, else a two-stage model's own outline
    model, else the bundled one."""
    return served_segmenter(loaded, args.segmenter)


def _outline_check(args: argparse.Namespace, loaded: Any, records: list[Any],
                   data: dict[str, Any]) -> int:
    """Evaluate a lesion model under every outline variant and print how often they agree."""
    results = {}
    for kind in OUTLINE_VARIANTS:
        variant = with_outline_variant(records, kind)
        results[kind] = evaluate(loaded, variant, device=args.device, batch_size=args.batch_size,
                                 data={**data, "n": len(records), "masks": kind},
                                 backend=args.backend)
        print(f"Model {loaded.card.name} on {len(records)} images ({data['subset']}), {kind} "
              "outlines:")
        print(format_metrics(results[kind].metrics))
    summary = outline_agreement(results)
    agree = ", ".join(f"{k} {v:.3f}" for k, v in summary["same_class_as_reference"].items()
                      if v is not None)
    print(f"Same class as with the expert outline on {summary['n_lesion']} lesion images: "
          f"{agree}; all outlines agree: {summary['all_agree']}")
    if args.json:
        out = {"outline_agreement": summary,
               "metrics": {k: r.metrics for k, r in results.items()}}
        write_output(args.json, json.dumps(out, indent=2, allow_nan=False))
        print(f"Metrics written to {args.json}")
    return 0


def _two_stage(args: argparse.Namespace, loaded: Any, records: list[Any],
               data: dict[str, Any]) -> int:
    """Evaluate the two-stage reading: the lesion model on suggested outlines, the whole-image
    model where none is found."""
    if args.masks != "auto":
        raise BusError("--whole-image-model reads the images where the suggested outline finds "
                       "no lesion: use it with --masks auto.")
    whole_model = load_model(args.whole_image_model)
    if InputSpec.from_card(whole_model.card).uses_masks:
        raise BusError(f"{whole_model.card.name} reads lesion masks; --whole-image-model needs "
                       "a model of the whole image.")
    outlined = with_automatic_masks(records, _segmenter(args, loaded),
                                    Path(args.mask_dir) if args.mask_dir else None,
                                    progress=sys.stderr.isatty())
    found = [bool(r.masks) for r in outlined]
    common = {"device": args.device, "batch_size": args.batch_size, "backend": args.backend}
    lesion = evaluate(loaded, outlined, input_mode=loaded.card.input_mode, **common)
    whole = evaluate(whole_model, records, **common)
    result = two_stage(lesion, whole, found, {**data, "n": len(records), "masks": "automatic"},
                       normal_from_whole=args.normal_from_whole)
    metrics = result.metrics
    _given_threshold(args, result)
    print(f"{metrics['model']} on {len(records)} images ({data['subset']}); outlined "
          f"{metrics['outlined']}:")
    print(format_metrics(metrics))
    _fitted_threshold(result)
    if args.json:
        write_output(args.json, json.dumps(metrics, indent=2, allow_nan=False))
        print(f"Metrics written to {args.json}")
    return 0


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    """The `evaluate` command's options."""
    p = sub.add_parser("evaluate", help="evaluate a model on data")
    p.add_argument("--model", help="model folder (default: the active model)")
    add_data(p)
    p.add_argument("--split", help="split JSON; evaluate only --subset of it")
    p.add_argument("--subset", default="test", choices=EVALUATION_SUBSETS)
    p.add_argument("--json", help="write the metrics as JSON to this file")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--batch-size", type=int, default=32)
    add_backend(p)
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average each image with its mirror")
    p.add_argument("--input-mode", choices=INPUT_MODES,
                   help="replace the card's input mode (e.g. show a mask-mode model leak-free "
                        "inputs to measure the mask leak)")
    p.add_argument("--masks", choices=("auto", *OUTLINE_VARIANTS),
                   help="for a lesion (mask) model: the data's expert masks, the outlines the "
                        "segmentation model suggests (auto), or the expert masks dilated or "
                        "replaced by their bounding box (default: auto, the reading clinicians "
                        "get; expert with --input-mode)")
    p.add_argument("--whole-image-model",
                   help="with --masks auto, for a lesion model: the two-stage reading, this "
                        "whole-image model where the suggested outline finds no lesion")
    p.add_argument("--normal-from-whole", action="store_true",
                   help="with --whole-image-model: P(normal) from the whole-image model, the "
                        "lesion model only splitting the rest where an outline was found")
    p.add_argument("--malignant-threshold", type=float,
                   help="report the rule P(malignant) >= this instead of the card's threshold")
    p.add_argument("--outline-check", action="store_true",
                   help="for a lesion model: evaluate with expert, dilated and box outlines and "
                        "report how often the class stays the same")
    p.add_argument("--segmenter", help="segmentation model for --masks auto (default: a "
                                       "two-stage model's own, else the bundled one)")
    p.add_argument("--mask-dir", help="keep the automatic masks in this folder")
    p.set_defaults(func=cmd_evaluate)
