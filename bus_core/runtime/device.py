"""Where a model runs: CUDA (with AMP), then Apple MPS, then CPU with bf16 autocast and
channels_last where the CPU has native bf16, else plain fp32."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from bus_core.errors import DeviceError

DeviceChoice = Literal["auto", "cuda", "mps", "cpu", "cpu-fp32"]
DEVICE_CHOICES: tuple[str, ...] = ("auto", "cuda", "mps", "cpu", "cpu-fp32")


@dataclass(frozen=True)
class DeviceConfig:
    """A device with its autocast dtype (None = fp32) and memory format."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool

    @property
    def description(self) -> str:
        """A short human description, e.g. 'CPU, bf16' or 'NVIDIA H100 (79 GiB), fp16'."""
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        if self.device.type == "cuda":
            props = torch.cuda.get_device_properties(self.device)
            return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), {precision}"
        if self.device.type == "mps":
            return f"Apple GPU (MPS), {precision}"
        return f"CPU, {precision}"

    def to_dict(self) -> dict[str, str | bool]:
        """JSON-friendly summary for progress files and benchmarks."""
        return {"device": str(self.device), "precision": self.description.rsplit(", ", 1)[-1],
                "channels_last": self.channels_last, "description": self.description}


def cpu_supports_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX512-BF16 or AMX), so bf16 is faster than
    fp32. oneDNN also runs bf16 on plain AVX512 by emulation, about twice slower than fp32 for
    DenseNet121 (measured on an AVX512 Xeon without AVX512-BF16), so that does not count."""
    checks = [getattr(torch.cpu, name, None)
              for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(bool(check()) for check in checks if check is not None)
    except RuntimeError:
        return False


def physical_cores() -> int:
    """The CPU cores (not hardware threads) this process may run on: distinct (package, core)
    pairs of /proc/cpuinfo among the allowed CPUs where there is one, else the CPU count."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        blocks = Path("/proc/cpuinfo").read_text().split("\n\n")
    except OSError:
        blocks = []
    cores = set()
    for block in blocks:
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        if "processor" not in fields or "core id" not in fields:
            continue
        if allowed is None or int(fields["processor"]) in allowed:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or len(allowed or ()) or os.cpu_count() or 1


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def choose_device(choice: str = "auto") -> DeviceConfig:
    """The device for `choice` ('auto', 'cuda', 'mps', 'cpu' = bf16 when supported, 'cpu-fp32');
    `DeviceError` when the machine does not have it."""
    if choice not in DEVICE_CHOICES:
        raise DeviceError(f"Unknown device {choice!r}; choose one of {', '.join(DEVICE_CHOICES)}.")
    if choice in ("auto", "cuda") and torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return DeviceConfig(torch.device("cuda"), dtype, channels_last=True)
    if choice == "cuda":
        raise DeviceError("No CUDA GPU is available on this machine: choose the device 'auto' "
                          "(whatever this machine has) or 'cpu'.")
    if choice in ("auto", "mps") and _mps_available():
        return DeviceConfig(torch.device("mps"), torch.float16, channels_last=False)
    if choice == "mps":
        raise DeviceError("Apple MPS is not available on this machine: choose the device 'auto' "
                          "(whatever this machine has) or 'cpu'.")
    if choice != "cpu-fp32" and cpu_supports_bf16():
        return DeviceConfig(torch.device("cpu"), torch.bfloat16, channels_last=True)
    return DeviceConfig(torch.device("cpu"), None, channels_last=False)


def fp32_cpu() -> DeviceConfig:
    """The naive reference path: CPU, fp32, NCHW."""
    return DeviceConfig(torch.device("cpu"), None, channels_last=False)


@contextlib.contextmanager
def autocast(config: DeviceConfig) -> Iterator[None]:
    """Mixed precision for the forward pass on `config`, or nothing in fp32."""
    if config.amp_dtype is None:
        yield
        return
    with torch.autocast(device_type=config.device.type, dtype=config.amp_dtype):
        yield


def prepare_model(model: torch.nn.Module, config: DeviceConfig) -> torch.nn.Module:
    """Move `model` to the device and memory format of `config` (in place; returns it)."""
    model.to(config.device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def to_device(batch: torch.Tensor, config: DeviceConfig) -> torch.Tensor:
    """Move an NCHW batch to the device and memory format of `config`."""
    batch = batch.to(config.device, non_blocking=True)
    if config.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


def needs_grad_scaler(config: DeviceConfig) -> bool:
    """fp16 on CUDA needs loss scaling; bf16 and fp32 do not."""
    return config.device.type == "cuda" and config.amp_dtype == torch.float16
