"""Data from the command line: `split`, `leak`, `manifest`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bus_core.cli.common import add_data, write_output
from bus_core.data.dataset import class_counts, load_many, write_manifest
from bus_core.data.inputs import INPUT_MODES, InputSpec, blank_input_share
from bus_core.data.splits import (
    SUBSETS,
    describe_groups,
    find_groups,
    hold_out,
    load_split,
    make_kfold,
    make_split,
    merge_splits,
    save_split,
    select_records,
)
from bus_core.errors import BusError


def cmd_split(args: argparse.Namespace) -> int:
    """Group near-duplicates / patients and save a stratified group split (or k folds)."""
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


def cmd_leak(args: argparse.Namespace) -> int:
    """Share of black model inputs per class under each input mode (the mask leak)."""
    records, data = select_records(args.data, args.split, args.subset)
    result = {mode: blank_input_share(records, InputSpec.of(mode)) for mode in INPUT_MODES}
    print(f"Share of all-black model inputs on {len(records)} images ({data['subset']}):")
    for mode, per_class in result.items():
        print(f"  {mode:<14} " + "  ".join(
            f"{label} {v['black_share']:.2f} (n={v['n']})" for label, v in per_class.items()))
    if args.json:
        write_output(args.json, json.dumps({"data": data, "n": len(records),
                                               "black_share": result}, indent=2))
    return 0


def cmd_manifest(args: argparse.Namespace) -> int:
    """Write the records of data (optionally one split subset) as a CSV manifest."""
    records, data = select_records(args.data, args.split, args.subset)
    write_manifest(records, args.out)
    counts = ", ".join(f"{k} {v}" for k, v in class_counts(records).items())
    print(f"{len(records)} images ({data['subset']}: {counts}) written to {args.out}")
    return 0


def add_split(sub: argparse._SubParsersAction) -> None:
    """The `split` command's options."""
    p = sub.add_parser("split", help="make a leakage-safe split file")
    add_data(p)
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


def add_leak(sub: argparse._SubParsersAction) -> None:
    """The `leak` command's options."""
    p = sub.add_parser("leak", help="measure the mask leak: black inputs per class and mode")
    add_data(p)
    p.add_argument("--split", help="split JSON; measure only --subset of it")
    p.add_argument("--subset", default="test", choices=("train", "val", "test"))
    p.add_argument("--json", help="write the shares as JSON to this file")
    p.set_defaults(func=cmd_leak)


def add_manifest(sub: argparse._SubParsersAction) -> None:
    """The `manifest` command's options."""
    p = sub.add_parser("manifest", help="write data (or one split subset) as a CSV manifest, "
                                        "e.g. to add only the training patients with --extra-train")
    add_data(p)
    p.add_argument("--split", help="split JSON; write only --subset of it")
    p.add_argument("--subset", default="train", choices=("train", "val", "test"))
    p.add_argument("--out", required=True, help="CSV file to write")
    p.set_defaults(func=cmd_manifest)
