"""The model registry from the command line: `models`."""

from __future__ import annotations

import argparse
from pathlib import Path

from bus_core.models.registry import active_model_path, list_models, set_active_model
from bus_core.roles import operator


def cmd_models(args: argparse.Namespace) -> int:
    """List the installed models; --activate PATH makes one the default."""
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


def add_models(sub: argparse._SubParsersAction) -> None:
    """The `models` command's options."""
    p = sub.add_parser("models", help="list models / choose the active one")
    p.add_argument("--activate", help="model folder to make the default")
    p.set_defaults(func=cmd_models)
