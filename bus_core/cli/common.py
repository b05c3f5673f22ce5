"""What the command groups share: common options and writing the output files they name."""

from __future__ import annotations

import argparse
from pathlib import Path

from bus_core import atomic
from bus_core.errors import storage
from bus_core.runtime.backends import BACKEND_ENV, BACKENDS


def add_data(p: argparse.ArgumentParser, required: bool = True) -> None:
    """The repeatable --data option."""
    p.add_argument("--data", action="append", required=required,
                   help="BUSI-layout folder or CSV manifest (repeat to combine)")


def add_backend(p: argparse.ArgumentParser) -> None:
    """The --backend option of the commands that run a model."""
    p.add_argument("--backend", choices=BACKENDS,
                   help=f"forward pass: OpenVINO on CPUs where installed ('auto'), 'openvino' or "
                        f"'torch' (default: ${BACKEND_ENV}, else auto)")


def write_output(path: str, content: str | bytes) -> None:
    """Write an output file named on the command line (--json, --cam), making its folder."""
    target = Path(path)
    with storage(f"write {target}"):
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(target, content.encode() if isinstance(content, str) else content)
