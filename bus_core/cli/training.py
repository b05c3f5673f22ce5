"""Training from the command line: `train`, `train-seg`, `tune`, `compare`."""

from __future__ import annotations

import argparse
import json

from bus_core.metrics import fmt3, format_metrics
from bus_core.runtime.distributed import Ranks
from bus_core.training import architectures, segmenter, train
from bus_core.training.architectures import get_args_parser as compare_args_parser
from bus_core.training.segmenter import get_args_parser as seg_args_parser
from bus_core.training.train import config_from_args, get_args_parser
from bus_core.training.tune import DEFAULT_GRID, parse_grid, tune


def cmd_train(args: argparse.Namespace) -> int:
    """Train a model (see bus_core.training.train)."""
    result = train.main(args)
    if not Ranks.from_env().is_main:  # under torchrun, rank 0 alone reports the run
        return 0
    if result.status != "done":
        print(f"Training {result.status}; resume with --resume --out {result.out}")
        return 1

    print(f"Model saved to {result.out}")
    if result.card and "test" in result.card.metrics:
        print("Test subset:\n" + format_metrics(result.card.metrics["test"]))
    return 0


def cmd_train_seg(args: argparse.Namespace) -> int:
    """Train the lesion segmenter, optionally multi-task (see bus_core.training.segmenter)."""
    out = segmenter.main(args)
    print(f"Segmentation model saved to {out / 'segmenter'}")
    if (out / "classifier").is_dir():
        print(f"Classifier sharing its encoder saved to {out / 'classifier'}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Grid search over training settings; prints the results table."""
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
    """Train and compare architectures on one split (see bus_core.training.architectures)."""
    def show(row: dict) -> None:
        print(f"{row['row']}: accuracy {fmt3(row['accuracy'])}, malignant sensitivity "
              f"{fmt3(row['malignant_sensitivity'])}, at the threshold "
              f"{fmt3(row['sensitivity_at_threshold'])} / "
              f"{fmt3(row['specificity_at_threshold'])}", flush=True)

    rows = architectures.main(args, on_row=show)
    if rows is None:
        print(f"Comparison stopped; run the same command again to resume it in {args.out}.")
        return 1
    print(f"Results of {len(rows)} rows in {args.out}/results.csv and {args.out}/results.md")
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    """The `train` command's options."""
    sub.add_parser("train", parents=[get_args_parser(add_help=False)],
                   help="train a model").set_defaults(func=cmd_train)


def add_train_seg(sub: argparse._SubParsersAction) -> None:
    """The `train-seg` command's options."""
    p = sub.add_parser("train-seg", parents=[seg_args_parser(add_help=False)],
                       help="train the lesion segmenter (optionally with a classifier head)")
    p.set_defaults(func=cmd_train_seg)


def add_tune(sub: argparse._SubParsersAction) -> None:
    """The `tune` command's options."""
    p = sub.add_parser("tune", parents=[get_args_parser(add_help=False)],
                       help="hyper-parameter grid search", conflict_handler="resolve")
    p.add_argument("--grid", action="append",
                   help="NAME=V1,V2 (repeatable); default: lr x batch_size x optimizer of the "
                        "published intersection-masking method")
    p.add_argument("--epochs", type=int, default=5)
    p.set_defaults(func=cmd_tune)


def add_compare(sub: argparse._SubParsersAction) -> None:
    """The `compare` command's options."""
    sub.add_parser("compare", parents=[compare_args_parser(add_help=False)],
                   help="train and compare architectures on one split, sensitivity first"
                   ).set_defaults(func=cmd_compare)
