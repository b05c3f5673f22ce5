"""`python -m bus_core ...`: the top-level parser over the command groups (bus_core.cli.*), each
command a thin call into the library.

User errors (bad files, bad data, missing model) print one sentence and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bus_core.cli import accounts, data, evaluation, models, reading, training
from bus_core.cli.pacs import add_parser as add_pacs_parser
from bus_core.errors import BusError, storage_message
from bus_core.settings import configure_logging


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="python -m bus_core",
                                     description="Breast-ultrasound classifier tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    training.add_train(sub)
    training.add_train_seg(sub)
    reading.add_segment(sub)
    evaluation.add_evaluate(sub)
    reading.add_predict(sub)
    reading.add_report(sub)
    data.add_split(sub)
    training.add_tune(sub)
    training.add_compare(sub)
    data.add_leak(sub)
    data.add_manifest(sub)
    models.add_models(sub)
    reading.add_warm(sub)
    accounts.add_users(sub)

    add_pacs_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
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
