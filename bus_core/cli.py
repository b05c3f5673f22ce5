"""`python -m bus_core ...`: one function per subcommand, each a thin call into the library.

User errors (bad files, bad data, missing model) print one sentence and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bus_core import atomic
from bus_core.errors import BusError, storage, storage_message
from bus_core.splits import EVALUATION_SUBSETS


def _add_data(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", action="append", required=required,
                   help="BUSI-layout folder or CSV manifest (repeat to combine)")


def cmd_train(args: argparse.Namespace) -> int:
    """Train a model (see bus_core.train)."""
    from bus_core import train
    from bus_core.distributed import Ranks

    result = train.main(args)
    if not Ranks.from_env().is_main:  # under torchrun, rank 0 alone reports the run
        return 0
    if result.status != "done":
        print(f"Training {result.status}; resume with --resume --out {result.out}")
        return 1
    from bus_core.metrics import format_metrics

    print(f"Model saved to {result.out}")
    if result.card and "test" in result.card.metrics:
        print("Test subset:\n" + format_metrics(result.card.metrics["test"]))
    return 0


def _records_for(args: argparse.Namespace):
    from bus_core.dataset import load_many
    from bus_core.splits import load_split, split_records

    records = load_many(args.data)
    if not records:
        raise BusError(f"There are no labelled images in {', '.join(args.data)}.")
    if args.split:
        split = load_split(args.split)
        chosen = split_records(records, split, args.subset)
        if not chosen:
            raise BusError(f"None of these images is in the {args.subset} subset of "
                           f"{args.split}: is it the split file of this data?")
        return chosen, {"sources": args.data, "split_file": args.split, "subset": args.subset,
                        "data_hash": split.data_hash}
    return records, {"sources": args.data, "subset": "all"}


def cmd_train_seg(args: argparse.Namespace) -> int:
    """Train the lesion segmenter, optionally multi-task (see bus_core.seg_train)."""
    from bus_core import seg_train

    out = seg_train.main(args)
    print(f"Segmentation model saved to {out / 'segmenter'}")
    if (out / "classifier").is_dir():
        print(f"Classifier sharing its encoder saved to {out / 'classifier'}")
    return 0


def _evaluate_segmenter(args: argparse.Namespace, loaded) -> int:
    from bus_core.evaluate import evaluate_segmentation
    from bus_core.metrics import format_segmentation
    from bus_core.segment import Segmenter

    records, data = _records_for(args)
    result = evaluate_segmentation(Segmenter(loaded, args.device if args.device != "auto"
                                             else "cpu-fp32"), records,
                                   progress=sys.stderr.isatty(), data={**data, "n": len(records)})
    print(f"Segmentation model {result['model']} on {len(records)} images ({data['subset']}):")
    print(format_segmentation(result))
    if args.json:
        _write_output(args.json, json.dumps(result, indent=2, allow_nan=False))
        print(f"Metrics written to {args.json}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a model on data (optionally one subset of a split file)."""
    from bus_core.evaluate import (
        EXPERT,
        OUTLINE_POLICIES,
        SERVED,
        evaluate,
        reads_outlines,
        with_policy_outlines,
    )
    from bus_core.metrics import format_metrics
    from bus_core.models import load_model
    from bus_core.registry import active_model_path, no_model_message

    path = args.model or active_model_path()
    if path is None:
        raise BusError(no_model_message(command_line=True))
    loaded = load_model(path)
    if loaded.card.task == "segmentation":
        return _evaluate_segmenter(args, loaded)
    records, data = _records_for(args)
    reads_masks = reads_outlines(loaded.card)
    if (args.masks not in (None, "expert") or args.outline_check) and not reads_masks:
        raise BusError(f"--masks {args.masks} and --outline-check are for models that read a "
                       "lesion mask; this model uses the whole image.")
    # the outline policy of bus_core.evaluate: by default a model that reads an outline is
    # scored as clinicians get its reading, on the suggested outlines (not with --input-mode,
    # which scores the lesion model alone)
    args.masks = args.masks or ("auto" if reads_masks and not args.input_mode else "expert")
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
        from bus_core.segment import with_outline_variant

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
        _write_output(args.json, json.dumps(out, indent=2, allow_nan=False))
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
    from bus_core.constants import MALIGNANT
    from bus_core.metrics import fit_malignant_threshold

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
    from bus_core.evaluate import served_segmenter

    return served_segmenter(loaded, args.segmenter)


def _outline_check(args: argparse.Namespace, loaded: Any, records: list[Any],
                   data: dict[str, Any]) -> int:
    """Evaluate a lesion model under every outline variant and print how often they agree."""
    from bus_core.evaluate import evaluate, outline_agreement
    from bus_core.masks import OUTLINE_VARIANTS
    from bus_core.metrics import format_metrics
    from bus_core.segment import with_outline_variant

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
        _write_output(args.json, json.dumps(out, indent=2, allow_nan=False))
        print(f"Metrics written to {args.json}")
    return 0


def _two_stage(args: argparse.Namespace, loaded: Any, records: list[Any],
               data: dict[str, Any]) -> int:
    """Evaluate the two-stage reading: the lesion model on suggested outlines, the whole-image
    model where none is found."""
    from bus_core.evaluate import evaluate, two_stage
    from bus_core.inputs import InputSpec
    from bus_core.metrics import format_metrics
    from bus_core.models import load_model
    from bus_core.segment import with_automatic_masks

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
        _write_output(args.json, json.dumps(metrics, indent=2, allow_nan=False))
        print(f"Metrics written to {args.json}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict one image (with optional masks) and optionally save a Grad-CAM overlay; with
    --out, every image of the inputs into a CSV file."""
    from bus_core.cam import overlay
    from bus_core.io import image_to_png_bytes
    from bus_core.predict import Predictor, predict_file

    if args.out:
        return _predict_many(args)
    if len(args.inputs) != 1:
        raise BusError("Give one image, or --out results.csv to predict several (files, "
                       "folders, CSV manifests, DICOM series).")
    image_path = args.inputs[0]
    predictor = Predictor.from_path(args.model, device=args.device, backend=args.backend)
    mask_note = ""
    if predictor.spec.uses_masks and not args.mask and not predictor.two_stage:
        from bus_core.io import load_image
        from bus_core.segment import Segmenter

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
        _write_output(args.cam, image_to_png_bytes(overlay(seen, heat)))
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
    """`predict INPUT ... --out results.csv` (see bus_core.batch); prints a one-line summary."""
    from bus_core.batch import list_items, predict_to_csv, write_studies
    from bus_core.predict import Predictor
    from bus_core.study import DEFAULT_RULE, RULES

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
    from bus_core.io import load_image
    from bus_core.pdf_report import read_study, render_study_pdf
    from bus_core.predict import Predictor

    predictor = Predictor.from_path(args.model, device=args.device, backend=args.backend)
    images = [load_image(path) for path in args.images]
    names = [Path(path).name for path in args.images] if args.file_names else []
    report = read_study(predictor, images, names=names, name=args.name, rule=args.rule)
    _write_output(args.out, render_study_pdf(report))
    reading = (f"study reading {report.combined_label}" if report.combined is not None
               else f"reading {report.images[0].label}")
    print(f"Report of {len(images)} image{'s' if len(images) > 1 else ''} ({reading}) written "
          f"to {args.out}.")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    """Write a suggested lesion mask (<stem>_mask.png, 0/255, the image's size) per image."""
    from bus_core.segment import Segmenter, segment_inputs

    segmenter = Segmenter.from_path(args.model, device=args.device)
    report = segment_inputs(args.inputs, Path(args.out), segmenter,
                            progress=sys.stderr.isatty(), batch_size=args.batch_size)
    for name, problem in report.skipped:
        print(f"Skipped {name}: {problem}", file=sys.stderr)
    print(f"{report.written} masks written to {args.out} ({report.empty} with no lesion found); "
          f"{len(report.skipped)} files skipped.")
    return 0 if report.written or not report.skipped else 2


def cmd_split(args: argparse.Namespace) -> int:
    """Group near-duplicates / patients and save a stratified group split (or k folds)."""
    from bus_core.dataset import load_many
    from bus_core.splits import (
        describe_groups,
        find_groups,
        hold_out,
        load_split,
        make_kfold,
        make_split,
        merge_splits,
        save_split,
    )

    records = load_many(args.data)
    if not records:
        raise BusError(f"There are no labelled images in {', '.join(args.data)} to split.")
    if args.merge:
        return _save_split(merge_splits([load_split(path) for path in args.merge], records),
                           args.out)
    if args.hold_out:
        if not args.base:
            raise BusError("--hold-out needs --base, the split file to derive the new one from.")
        return _save_split(hold_out(load_split(args.base), records, _read_ids(args.hold_out)),
                           args.out)
    groups = find_groups(records, progress=sys.stderr.isatty())
    print(describe_groups(groups, records))
    if args.kfold:
        out = Path(args.out)
        for k, fold in enumerate(make_kfold(records, args.kfold, seed=args.seed, groups=groups)):
            path = out.with_name(f"{out.stem}_fold{k}{out.suffix or '.json'}")
            save_split(fold, path)
            print(f"Fold {k}: {path}")
        return 0
    return _save_split(make_split(records, ratios=tuple(args.ratios), seed=args.seed,
                                  groups=groups), args.out)


def _save_split(split: Any, out: str) -> int:
    """Save a split file and say how many images each subset got."""
    from bus_core.splits import SUBSETS, save_split

    save_split(split, out)
    print(f"Split saved to {out}: " + ", ".join(
        f"{name} {len(split.subset(name))}" for name in SUBSETS))
    return 0


def _read_ids(path: str) -> list[str]:
    """The non-empty lines of a text file of image ids."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise BusError(f"Cannot read the id list {path} ({error}).") from error
    return [line.strip() for line in text.splitlines() if line.strip()]


def cmd_tune(args: argparse.Namespace) -> int:
    """Grid search over training settings; prints the results table."""
    from bus_core.train import config_from_args
    from bus_core.tune import DEFAULT_GRID, parse_grid, tune

    grid = parse_grid(args.grid) if args.grid else DEFAULT_GRID
    base = config_from_args(args)

    def show(row: dict) -> None:
        print(json.dumps(row), flush=True)

    rows = tune(base, grid, on_result=show)
    print(f"\nResults (best validation {base.monitor} first), saved in {args.out}/results.csv:")
    keys = list(rows[0]) if rows else []
    print("  ".join(keys))
    for row in rows:
        print("  ".join(f"{row[k]:.4g}" if isinstance(row[k], float) else str(row[k])
                        for k in keys))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Train and compare architectures on one split (see bus_core.compare)."""
    from bus_core import compare
    from bus_core.metrics import fmt3

    def show(row: dict) -> None:
        print(f"{row['row']}: accuracy {fmt3(row['accuracy'])}, malignant sensitivity "
              f"{fmt3(row['malignant_sensitivity'])}, at the threshold "
              f"{fmt3(row['sensitivity_at_threshold'])} / "
              f"{fmt3(row['specificity_at_threshold'])}", flush=True)

    rows = compare.main(args, on_row=show)
    if rows is None:
        print(f"Comparison stopped; run the same command again to resume it in {args.out}.")
        return 1
    print(f"Results of {len(rows)} rows in {args.out}/results.csv and {args.out}/results.md")
    return 0


def cmd_leak(args: argparse.Namespace) -> int:
    """Share of black model inputs per class under each input mode (the mask leak)."""
    from bus_core.inputs import INPUT_MODES, InputSpec, blank_input_share

    records, data = _records_for(args)
    result = {mode: blank_input_share(records, InputSpec.of(mode)) for mode in INPUT_MODES}
    print(f"Share of all-black model inputs on {len(records)} images ({data['subset']}):")
    for mode, per_class in result.items():
        print(f"  {mode:<14} " + "  ".join(
            f"{label} {v['black_share']:.2f} (n={v['n']})" for label, v in per_class.items()))
    if args.json:
        _write_output(args.json, json.dumps({"data": data, "n": len(records),
                                               "black_share": result}, indent=2))
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    """Write the records of data (optionally one split subset) as a CSV manifest."""
    from bus_core.dataset import class_counts, write_manifest

    records, data = _records_for(args)
    write_manifest(records, args.out)
    counts = ", ".join(f"{k} {v}" for k, v in class_counts(records).items())
    print(f"{len(records)} images ({data['subset']}: {counts}) written to {args.out}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List the installed models; --activate PATH makes one the default."""
    from bus_core.registry import active_model_path, list_models, set_active_model
    from bus_core.roles import operator

    if args.activate:
        set_active_model(args.activate, who=operator())
        print(f"Active model: {args.activate}")
        return 0
    active = active_model_path()
    for entry in list_models():
        test = entry.card.metrics.get("test", {})
        mark = "*" if active and entry.path.resolve() == Path(active).resolve() else " "
        acc = test.get("accuracy")
        print(f"{mark} {entry.card.name:<28} {entry.card.arch:<13} "
              f"{'bundled' if entry.bundled else 'user':<8} "
              f"test acc {acc if acc is None else f'{acc:.3f}'}  {entry.path}")
    return 0


def cmd_warm(args: argparse.Namespace) -> int:
    """Prepare a model (default: the active one) and the active outline model for this
    computer, printing each network as it is ready, and what keeping the OpenVINO cache to the
    installed models removed."""
    from bus_core.registry import active_segmenter_path
    from bus_core.warm import warm

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


def cmd_users(args: argparse.Namespace) -> int:
    """Manage the app's local accounts (as the command-line operator: every role)."""
    from bus_core.accounts import Accounts
    from bus_core.roles import operator
    from bus_core.store import open_store

    with open_store(args.db) as store:
        accounts, me = Accounts(store), operator()
        if args.action == "list":
            for user in accounts.list_users():
                state = "disabled" if user.disabled else "locked" if user.locked() else "active"
                print(f"{user.name:<24} {','.join(sorted(user.roles)):<40} {state:<8} "
                      f"{'password' if user.has_password else 'single sign-on'}  "
                      f"last sign-in {user.last_signin or 'never'}")
        elif args.action == "log":
            for entry in reversed(accounts.log(args.limit)):
                print(f"{entry['at']}  {entry['who']}: {entry['action']} {entry['subject'] or ''}"
                      f"{'  (' + str(entry['detail']) + ')' if entry['detail'] else ''}")
        elif args.action == "add":
            if args.exist_ok and accounts.get(args.name.strip()) is not None:
                print(f"User {args.name.strip()} exists already; left as it is.")
                return 0
            password = None if args.no_password else _read_password(args.password_stdin)
            user = accounts.add(me, args.name, args.role, password)
            print(f"Added {user.name} ({', '.join(sorted(user.roles))}).")
        elif args.action == "set-role":
            user = accounts.set_roles(me, args.name, args.roles)
            print(f"{user.name} now has the roles {', '.join(sorted(user.roles))}.")
        elif args.action in ("disable", "enable"):
            accounts.set_disabled(me, args.name, args.action == "disable")
            print(f"{args.name} is {args.action}d.")
        elif args.action == "passwd":
            accounts.set_password(me, args.name, _read_password(args.password_stdin))
            print(f"New password set for {args.name} (the account is unlocked).")
    return 0


def _read_password(from_stdin: bool) -> str:
    """The new password: one line of standard input, or typed twice at a terminal."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise BusError("Give the password on standard input with --password-stdin.")
    import getpass

    first = getpass.getpass("New password: ")
    if getpass.getpass("Again: ") != first:
        raise BusError("The two passwords differ: nothing was changed.")
    return first


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    from bus_core.batch import DEFAULT_BATCH_SIZE
    from bus_core.device import DEVICE_CHOICES
    from bus_core.inputs import INPUT_MODES
    from bus_core.masks import OUTLINE_VARIANTS
    from bus_core.seg_train import get_args_parser as seg_args_parser
    from bus_core.train import get_args_parser

    parser = argparse.ArgumentParser(prog="python -m bus_core",
                                     description="Breast-ultrasound classifier tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("train", parents=[get_args_parser(add_help=False)],
                   help="train a model").set_defaults(func=cmd_train)

    p = sub.add_parser("train-seg", parents=[seg_args_parser(add_help=False)],
                       help="train the lesion segmenter (optionally with a classifier head)")
    p.set_defaults(func=cmd_train_seg)

    p = sub.add_parser("segment", help="write a suggested lesion mask for each image")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image file, BUSI-layout (or flat) image folder, or CSV manifest")
    p.add_argument("--out", required=True, help="folder for the <image stem>_mask.png files")
    p.add_argument("--model", help="segmentation model folder (default: the bundled one)")
    p.add_argument("--device", default="cpu-fp32", choices=DEVICE_CHOICES)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("evaluate", help="evaluate a model on data")
    p.add_argument("--model", help="model folder (default: the active model)")
    _add_data(p)
    p.add_argument("--split", help="split JSON; evaluate only --subset of it")
    p.add_argument("--subset", default="test", choices=EVALUATION_SUBSETS)
    p.add_argument("--json", help="write the metrics as JSON to this file")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--batch-size", type=int, default=32)
    _add_backend(p)
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
    _add_backend(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("report", help="the PDF report of one study (several images of it)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="the study's image files")
    p.add_argument("--out", required=True, help="PDF file to write")
    p.add_argument("--model", help="model folder (default: the active model)")
    _add_rule(p)
    p.add_argument("--name", default="",
                   help="the study's name in the report (default: none; no patient names "
                        "unless you choose to print one)")
    p.add_argument("--file-names", action="store_true",
                   help="print each image's file name (off by default: file names often "
                        "hold a patient's name)")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    _add_backend(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("split", help="make a leakage-safe split file")
    _add_data(p)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ratios", type=float, nargs=3, default=[0.7, 0.15, 0.15],
                   metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--kfold", type=int, help="write K fold files instead of one split")
    p.add_argument("--base", help="with --hold-out: the split to derive the new one from")
    p.add_argument("--hold-out", metavar="IDS",
                   help="text file of image ids (one a line, e.g. one scanner's): they leave "
                        "--base's train and val; the test subset is those of them in --base's "
                        "val and test")
    p.add_argument("--merge", nargs="+", metavar="SPLIT",
                   help="split files of different data sets (given with --data) to join into "
                        "one: each subset is the union of theirs")
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("tune", parents=[get_args_parser(add_help=False)],
                       help="hyper-parameter grid search", conflict_handler="resolve")
    p.add_argument("--grid", action="append",
                   help="NAME=V1,V2 (repeatable); default: lr x batch_size x optimizer of the "
                        "published intersection-masking method")
    p.add_argument("--epochs", type=int, default=5)
    p.set_defaults(func=cmd_tune)

    from bus_core.compare import get_args_parser as compare_args_parser

    sub.add_parser("compare", parents=[compare_args_parser(add_help=False)],
                   help="train and compare architectures on one split, sensitivity first"
                   ).set_defaults(func=cmd_compare)

    p = sub.add_parser("leak", help="measure the mask leak: black inputs per class and mode")
    _add_data(p)
    p.add_argument("--split", help="split JSON; measure only --subset of it")
    p.add_argument("--subset", default="test", choices=("train", "val", "test"))
    p.add_argument("--json", help="write the shares as JSON to this file")
    p.set_defaults(func=cmd_leak)

    p = sub.add_parser("manifest", help="write data (or one split subset) as a CSV manifest, "
                                        "e.g. to add only the training patients with --extra-train")
    _add_data(p)
    p.add_argument("--split", help="split JSON; write only --subset of it")
    p.add_argument("--subset", default="train", choices=("train", "val", "test"))
    p.add_argument("--out", required=True, help="CSV file to write")
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser("models", help="list models / choose the active one")
    p.add_argument("--activate", help="model folder to make the default")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("warm", help="prepare the active model (or --model) for this computer "
                                    "before the first reading")
    p.add_argument("--model", help="model folder (default: the active model)")
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    _add_backend(p)
    p.set_defaults(func=cmd_warm)

    from bus_core.roles import ROLES

    p = sub.add_parser("users", help="manage the app's local accounts")
    p.add_argument("--db", help="case database (path or SQLAlchemy URL; default: "
                                "$BUS_DATABASE_URL, else the data folder's cases.sqlite)")
    users = p.add_subparsers(dest="action", required=True)
    q = users.add_parser("add", help="add a user")
    q.add_argument("name")
    q.add_argument("--role", action="append", required=True, choices=ROLES,
                   help="repeat for several roles")
    q.add_argument("--password-stdin", action="store_true",
                   help="read the password from standard input (else typed twice)")
    q.add_argument("--no-password", action="store_true",
                   help="a single-sign-on user: only the roles are kept here")
    q.add_argument("--exist-ok", action="store_true",
                   help="do nothing when the user exists already")
    users.add_parser("list", help="list the users")
    q = users.add_parser("log", help="the account audit log (sign-ins, changes)")
    q.add_argument("--limit", type=int, default=50)
    q = users.add_parser("set-role", help="replace a user's roles")
    q.add_argument("name")
    q.add_argument("roles", nargs="+", choices=ROLES, metavar="ROLE")
    for action in ("disable", "enable"):
        users.add_parser(action, help=f"{action} a user").add_argument("name")
    q = users.add_parser("passwd", help="set a user's password (unlocks the account)")
    q.add_argument("name")
    q.add_argument("--password-stdin", action="store_true")
    p.set_defaults(func=cmd_users)

    from bus_core.pacs_cli import add_parser as add_pacs_parser

    add_pacs_parser(sub)
    return parser


def _add_backend(p: argparse.ArgumentParser) -> None:
    from bus_core.backends import BACKEND_ENV, BACKENDS

    p.add_argument("--backend", choices=BACKENDS,
                   help=f"forward pass: OpenVINO on CPUs where installed ('auto'), 'openvino' or "
                        f"'torch' (default: ${BACKEND_ENV}, else auto)")


def _add_rule(p: argparse.ArgumentParser) -> None:
    from bus_core.study import DEFAULT_RULE, RULES

    p.add_argument("--rule", default=DEFAULT_RULE, choices=list(RULES),
                   help="how the images' readings make the study's: "
                        + "; ".join(f"{k}, {v}" for k, v in RULES.items())
                        + " (default: %(default)s)")


def _write_output(path: str, content: str | bytes) -> None:
    """Write an output file named on the command line (--json, --cam), making its folder."""
    target = Path(path)
    with storage(f"write {target}"):
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(target, content.encode() if isinstance(content, str) else content)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    from bus_core.settings import configure_logging

    configure_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BusError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file or folder this command reads or writes
        print(f"Error: {storage_message('finish the command', exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
