"""The forward pass of the prediction path: PyTorch on any device, or OpenVINO on CPUs.

    batch (N x 3 x H x W float32, normalised) --Forward--> logits (N x classes float32)

OpenVINO (Apache-2.0, made for CPU inference) is used when `backend` is 'openvino', or 'auto'
on a CPU where the `openvino` package is installed; anything that fails on that path (package
missing, conversion or compilation error) falls back to PyTorch with a log line, never an
error. The converted model (OpenVINO IR) is cached on disk per weights hash, input size and
OpenVINO version under `<data dir>/cache/openvino/`, so a restart does not convert again; new
weights get a new entry, with its compiled blobs inside it. Processes sharing the data folder
convert and compile one at a time (a lock file in the cache), so none reads a blob another is
still writing; `prune_cache` removes the entries of weights no installed model has.
Precision: fp32 on CPUs without native bf16; where the CPU has it, the faster of bf16 and fp32
for this model, timed once per model and CPU when it is first compiled and remembered in
`precision.json` beside the cache (native bf16 is not always faster: on a 2-core Xeon with
AVX512-BF16 but no AMX, OpenVINO bf16 was slower than fp32). Agreement of bf16 with fp32 is
measured by `python -m bus_core.bench`. Grad-CAM always uses the PyTorch model (it needs
gradients).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol, cast, get_args

import numpy as np
import torch
from torch import nn

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

import copy

from bus_core.atomic import write_text
from bus_core.models.build import DenseNetClassifier, pools_into_linear
from bus_core.runtime.device import DeviceConfig, autocast, cpu_supports_bf16, to_device
from bus_core.settings import data_dir

log = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "openvino"]
BACKENDS: tuple[str, ...] = get_args(Backend)
BACKEND_ENV = "BUS_BACKEND"
"""Environment variable choosing the backend of the app and the CLI (default 'auto')."""
PRECISION_FILE = "precision.json"
"""In the OpenVINO cache folder: {"<IR entry> | <CPU model>": "bf16" or "f32"}, the measured
faster precision of each model on each CPU (a data folder may be shared by several servers),
and {"every network | <CPU model> | <OpenVINO version>": ...} once one was clearly faster."""
CLEAR_MARGIN = 1.3
"""A precision this many times faster than the other on one network is taken for every other
network on the same CPU and OpenVINO version without timing them (each costs a second compile
and the timing, about 0.7 s on 2 cores)."""
TIMED_CALLS = 7
"""Forward passes at batch 1 (after one warm-up) timed per precision; the median decides."""
PRECISIONS: tuple[str, ...] = ("bf16", "f32")
"""OpenVINO inference precision hints a CPU with native bf16 chooses between."""
COMPILED = "compiled"
"""In each IR entry of the cache: OpenVINO's compiled blobs of that IR."""
LOCK_FILE = ".lock"
"""In the cache folder: held while a process converts or compiles (`cache_lock`)."""


class _SignalStack(ctypes.Structure):
    """Linux's `stack_t`."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int),
                ("ss_size", ctypes.c_size_t)]


_SS_DISABLE = 2


@contextlib.contextmanager
def kept_signal_stack() -> Iterator[None]:
    """Give the calling thread back its alternate signal stack after the block. OpenVINO's CPU
    plugin installs its own on the thread that loads it and frees it when it unloads without
    restoring the old one; the next signal handled on that stack (Python's handlers use it,
    e.g. for SIGCHLD once PyTorch's DataLoader has set one) then kills the process with
    SIGSEGV. Every OpenVINO call that may load the plugin runs inside this. Linux only."""
    if not sys.platform.startswith("linux"):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    old = _SignalStack()
    saved = libc.sigaltstack(None, ctypes.byref(old)) == 0
    try:
        yield
    finally:
        if saved:
            old.ss_flags &= _SS_DISABLE  # SS_ONSTACK is a state, not a setting
            libc.sigaltstack(ctypes.byref(old), None)


def compile_on_cpu(model: Any, precision: str, cache: Path | None = None) -> Any:
    """`model` (an `openvino.Model` or an IR path) compiled for the CPU under the inference
    precision hint `precision` ('f32' or 'bf16'), compiled blobs kept in `cache` when given."""
    import openvino as ov  # optional (OpenVINO): imported where used

    with kept_signal_stack():
        core = ov.Core()
        if cache is not None:
            core.set_property({"CACHE_DIR": str(cache)})
        return core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})


class Forward(Protocol):
    """A model's forward pass from a normalised batch to float32 logits."""

    description: str

    def __call__(self, batch: torch.Tensor) -> np.ndarray: ...

    def run(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, the fp32 activations of the Grad-CAM layer when this backend returns
        them in the same pass, else None)."""
        ...

    def outputs(self, batch: torch.Tensor) -> list[np.ndarray]:
        """Every output of the network, in order, as float32 (a network returning a tuple
        has several)."""
        ...


class TorchForward:
    """The PyTorch model on its device, under the device's autocast."""

    def __init__(self, model: nn.Module, device: DeviceConfig) -> None:
        self.model, self.device = model, device
        self.description = f"PyTorch, {device.description}"

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode(), autocast(self.device):
            logits = self.model(to_device(batch, self.device))
        return logits.float().cpu().numpy()

    def run(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, None): autocast activations are not exact enough for the CAM."""
        return self(batch), None

    def outputs(self, batch: torch.Tensor) -> list[np.ndarray]:
        """Every output of the model (see `Forward.outputs`)."""
        with torch.inference_mode(), autocast(self.device):
            result = self.model(to_device(batch, self.device))
        return [t.float().cpu().numpy()
                for t in (result if isinstance(result, tuple) else (result,))]


class _LogitsAndActivations(nn.Module):
    """What OpenVINO converts for a DenseNetClassifier: its `forward_with_activations`."""

    def __init__(self, model: DenseNetClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_with_activations(x)


class OpenVinoForward:
    """The model converted to OpenVINO and compiled for the CPU (one call at a time)."""

    def __init__(self, model: nn.Module, weights_sha256: str, input_hw: tuple[int, int],
                 cache_root: Path, variant: str = "") -> None:
        """Compiled at the faster precision for this CPU (`choose_precision`); `variant`: see
        `choose_forward`."""
        import openvino as ov  # optional (OpenVINO): imported where used

        self.returns_activations = pools_into_linear(model)
        with cache_lock(cache_root):
            xml = _cached_ir(model, weights_sha256, input_hw, self.returns_activations,
                             cache_root, ov, variant)

            def compile_for(chosen: str) -> Any:
                return compile_on_cpu(str(xml), chosen, xml.parent / COMPILED)

            precision, self._compiled = choose_precision(compile_for, xml.parent.name, input_hw,
                                                         cache_root)
        self._lock = threading.Lock()  # a compiled model's default request is not re-entrant
        self.precision = precision
        self.description = f"OpenVINO {ov.get_version().split('-')[0]}, CPU, {precision}"

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        return self.run(batch)[0]

    def run(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, the final activations of a DenseNet, else None), from one pass."""
        result = self.outputs(batch)
        return result[0], result[1] if self.returns_activations else None

    def outputs(self, batch: torch.Tensor) -> list[np.ndarray]:
        """Every output of the converted model (see `Forward.outputs`)."""
        with self._lock:
            result = self._compiled(np.ascontiguousarray(batch.float().cpu().numpy()))
            return [np.asarray(result[i], dtype=np.float32)
                    for i in range(len(self._compiled.outputs))]


class OneOutput:
    """The forward pass of one model whose outputs a larger network computes in the same
    pass as another model's (a shared first stage, `unet.SharedFirstStage`): its logits are
    output `index` of that network's forward, its Grad-CAM activations output `activations`
    (None: none)."""

    def __init__(self, forward: Forward, index: int, activations: int | None = None) -> None:
        self.forward, self.index, self.activations = forward, index, activations
        self.description = forward.description

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        return self.run(batch)[0]

    def run(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """(this model's logits, its activations when the network returns them)."""
        return self.pick(self.forward.outputs(batch))

    def pick(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        """`run`'s answer from the network's outputs of one pass."""
        return outputs[self.index], None if self.activations is None else \
            outputs[self.activations]

    def outputs(self, batch: torch.Tensor) -> list[np.ndarray]:
        """This model's outputs: its logits (and activations)."""
        return [a for a in self.run(batch) if a is not None]


@contextlib.contextmanager
def cache_lock(cache_root: Path) -> Iterator[None]:
    """Hold the cache's lock while the block runs: one conversion or compilation at a time
    among the threads and processes sharing `cache_root` (OpenVINO writes its compiled blobs in
    place and maps them when reading, so a blob read while another process writes it crashes
    the reader). Without fcntl (Windows) there is no lock."""
    cache_root.mkdir(parents=True, exist_ok=True)
    with open(cache_root / LOCK_FILE, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def cpu_name() -> str:
    """This CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def interleaved_times(calls: Mapping[str, Callable[[], object]], n: int,
                      warmup: int = 3) -> dict[str, list[float]]:
    """Wall times (ms) of `n` calls of each of `calls`, timed in turns (round i calls each once,
    in order: A, B, A, B...), so that a noisy machine slows them alike; after `warmup` untimed
    calls of each."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(n):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - start) * 1000)
    return times


def interleaved_p50(forwards: Mapping[str, Callable[[np.ndarray], np.ndarray]],
                    batch: np.ndarray, n: int, warmup: int = 3) -> dict[str, float]:
    """Median ms of each forward on `batch`, timed in turns (`interleaved_times`)."""
    calls = {name: functools.partial(forward, batch) for name, forward in forwards.items()}
    return {name: round(float(np.median(t)), 2)
            for name, t in interleaved_times(calls, n, warmup).items()}


def choose_precision(compile_for: Callable[[str], Any], entry: str, input_hw: tuple[int, int],
                     cache_root: Path) -> tuple[str, Any]:
    """(precision, compiled model) for the IR entry `entry` (its name ends with its OpenVINO
    version, "-ov<version>"): fp32 on CPUs without native bf16; otherwise the precision
    remembered for this entry and CPU in `PRECISION_FILE`, or the one found clearly faster
    (`CLEAR_MARGIN`) on another network of this CPU and OpenVINO version, or else the faster of
    bf16 and fp32 timed in turns by `interleaved_p50` (then remembered; an unwritable cache only
    costs the timing again next start)."""
    if not cpu_supports_bf16():
        return "f32", compile_for("f32")
    path = cache_root / PRECISION_FILE
    key = f"{entry} | {cpu_name()}"
    every = f"every network | {cpu_name()} | {entry.rpartition('-ov')[2] if '-ov' in entry else ''}"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    for remembered in (key, every):
        if known.get(remembered) in PRECISIONS:
            return known[remembered], compile_for(known[remembered])
    compiled = {p: compile_for(p) for p in PRECISIONS}
    image = np.zeros((1, 3, *input_hw), dtype=np.float32)
    timings = interleaved_p50(compiled, image, TIMED_CALLS, warmup=1)
    fastest = min(timings, key=lambda p: timings[p])
    log.info("OpenVINO forward pass of %s: %s; using %s.", entry,
             ", ".join(f"{p} {ms:.1f} ms" for p, ms in timings.items()), fastest)
    learned = {key: fastest}
    if max(timings.values()) >= CLEAR_MARGIN * timings[fastest]:
        learned[every] = fastest
    try:
        write_text(path, json.dumps({**known, **learned}, indent=1))
    except OSError as exc:
        log.warning("Could not remember the precision choice in %s (%s).", path, exc)
    return fastest, compiled[fastest]


def cache_dir() -> Path:
    """Where converted OpenVINO models are kept."""
    return data_dir() / "cache" / "openvino"


def openvino_ir(model: nn.Module, weights_sha256: str, input_hw: tuple[int, int]) -> Path:
    """The IR (.xml) that `OpenVinoForward` compiles for `model`, from the cache (converted
    now when missing)."""
    import openvino as ov  # optional (OpenVINO): imported where used

    return _cached_ir(model, weights_sha256, input_hw, pools_into_linear(model), cache_dir(), ov)


def _cached_ir(model: nn.Module, weights_sha256: str, input_hw: tuple[int, int],
               with_activations: bool, cache_root: Path, ov, variant: str = "") -> Path:
    """The IR (.xml + .bin) of `model` (returning the Grad-CAM activations too when
    `with_activations`), converted once per weights, variant, input size, outputs and
    version."""
    h, w = input_hw
    version = ov.get_version().split("-")[0]
    extra = ("-act" if with_activations else "") + (f"-{variant}" if variant else "")
    folder = cache_root / f"{weights_sha256[:16]}-{h}x{w}{extra}-ov{version}"
    xml = folder / "model.xml"
    if xml.is_file() and xml.with_suffix(".bin").is_file():
        return xml
    cache_root.mkdir(parents=True, exist_ok=True)
    cpu = _cpu_fp32_copy(model)
    if with_activations:
        cpu = _LogitsAndActivations(cast(DenseNetClassifier, cpu)).eval()
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    with warnings.catch_warnings():  # OpenVINO traces the model with torch.jit (deprecated)
        warnings.simplefilter("ignore", FutureWarning)
        # traced once, without torch.jit's check that runs the model again to compare (a third
        # of a first start's conversion time); the tests compare OpenVINO with PyTorch instead
        traced = TorchScriptPythonDecoder(cpu, example_input=(torch.zeros(1, 3, h, w),),
                                          trace_kwargs={"check_trace": False})
        converted = ov.convert_model(traced, input=[ov.PartialShape([-1, 3, h, w])])
    staging = Path(tempfile.mkdtemp(dir=cache_root, prefix=".convert-"))
    try:
        ov.save_model(converted, str(staging / "model.xml"), compress_to_fp16=False)
        os.replace(staging, folder)  # a whole entry or none (a race leaves the first one)
    except OSError:
        if not xml.is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return xml


@dataclasses.dataclass(frozen=True)
class CacheReport:
    """What `prune_cache` removed (entry names), the bytes that freed and the cache's size
    after it."""

    removed: list[str]
    freed_bytes: int
    size_bytes: int


def folder_bytes(folder: Path) -> int:
    """The size of the files under `folder` (0 when there is none)."""
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):  # removed meanwhile
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    return total


def prune_cache(keep_weights: Collection[str], cache_root: Path | None = None) -> CacheReport:
    """Remove from the OpenVINO cache (default `cache_dir()`) the entries of weights not in
    `keep_weights` (sha256s of the models installed), those of other OpenVINO versions, the
    leftovers of interrupted conversions and their remembered precisions."""
    root = cache_root or cache_dir()
    if not root.is_dir():
        return CacheReport([], 0, 0)
    kept = {sha[:16] for sha in keep_weights}
    version = openvino_version()
    removed, freed = [], 0
    with cache_lock(root):
        for entry in sorted(p for p in root.iterdir() if p.is_dir()):
            sha, _, rest = entry.name.partition("-")
            current = sha in kept and (version is None or rest.endswith(f"-ov{version}"))
            if not current:
                freed += folder_bytes(entry)
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        _forget_precisions(root / PRECISION_FILE, set(removed))
    return CacheReport(removed, freed, folder_bytes(root))


def _forget_precisions(path: Path, entries: set[str]) -> None:
    """Remove the precision choices of the IR `entries` from the precision file."""
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(known, dict):
        return
    left = {key: value for key, value in known.items()
            if key.split(" | ", 1)[0] not in entries}
    if left != known:
        with contextlib.suppress(OSError):
            write_text(path, json.dumps(left, indent=1))


def openvino_version() -> str | None:
    """The installed OpenVINO's version as the cache names it, or None without OpenVINO."""
    try:
        import openvino as ov
    except ImportError:
        return None
    return str(ov.get_version().split("-")[0])


def _cpu_fp32_copy(model: nn.Module) -> nn.Module:
    """An fp32, contiguous-format CPU copy of `model` in eval mode (for conversion)."""
    copied = copy.deepcopy(model).to("cpu", dtype=torch.float32)
    copied.to(memory_format=torch.contiguous_format)
    return copied.eval()


def openvino_available() -> bool:
    """True when the openvino package can be imported."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def choose_forward(model: nn.Module, device: DeviceConfig, weights_sha256: str,
                   input_hw: tuple[int, int], backend: str | None = None,
                   variant: str = "") -> Forward:
    """The forward pass for `model` on `device`: OpenVINO for 'openvino', or for 'auto' on a
    CPU with openvino installed; PyTorch otherwise and whenever OpenVINO fails. `backend`
    defaults to $BUS_BACKEND, else 'auto'. `variant` names another network built on the
    weights `weights_sha256` (its own cache entry, kept as long as those weights are)."""
    backend = backend or os.environ.get(BACKEND_ENV) or "auto"
    if backend not in BACKENDS:
        log.warning("Unknown backend %r (choose one of %s): using PyTorch.", backend,
                    ", ".join(BACKENDS))
        backend = "torch"
    wants_openvino = backend == "openvino" or (backend == "auto" and device.device.type == "cpu")
    if wants_openvino and openvino_available():
        try:
            return OpenVinoForward(model, weights_sha256, input_hw, cache_dir(), variant)
        except Exception as exc:  # conversion / compilation problems: PyTorch still works
            log.warning("OpenVINO could not run this model (%s); using PyTorch.", exc)
    elif wants_openvino and backend == "openvino":
        log.warning("OpenVINO is not installed; using PyTorch.")
    return TorchForward(model, device)
