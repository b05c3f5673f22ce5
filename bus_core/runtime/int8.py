"""int8 post-training quantisation of the prediction path's OpenVINO model with NNCF, measured
against fp32 (`python -m bus_core.bench --int8`); the app does not use it.

    the backend's fp32 IR --nncf.quantize (calibration: BUSI training images)--> int8 IR
        (--nncf.quantize_with_accuracy_control, validation: a split subset, when the plain
         quantisation breaks the precision rule)

The rule: a precision qualifies when its labels agree with fp32 on >= 99% of the
validation images and its malignant sensitivity is the same as fp32's. Every image goes through
the evaluation's preprocessing (`inputs.record_input` + `presets.eval_transform`, for a
full-image model exactly what `predict.Prepare` does in the app). NNCF is optional
(`pip install nncf==3.4.0`, in requirements-dev.txt).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bus_core.constants import MALIGNANT
from bus_core.data.dataset import Record, load_records
from bus_core.data.images import load_image
from bus_core.data.inputs import InputSpec, record_input
from bus_core.data.presets import eval_transform
from bus_core.data.splits import load_split, split_records
from bus_core.errors import BusError, DataError
from bus_core.metrics import softmax
from bus_core.models.build import LoadedModel
from bus_core.runtime.backends import (
    compile_on_cpu,
    interleaved_p50,
    kept_signal_stack,
    openvino_ir,
)
from bus_core.runtime.device import cpu_supports_bf16

NNCF_VERSION = "3.4.0"
NNCF_MISSING = (f"The int8 measurement needs NNCF, which is not installed: run "
                f"`pip install nncf=={NNCF_VERSION}` and try again.")
MIN_AGREEMENT = 0.99
"""Share of validation labels a precision must keep equal to fp32's."""


class QuantisationError(BusError):
    """An int8 measurement that cannot run: NNCF missing, or no data to calibrate on."""


def nncf_available() -> bool:
    """True when the nncf package can be imported."""
    try:
        import nncf  # noqa: F401
    except ImportError:
        return False
    return True


def record_batches(records: Sequence[Record], spec: InputSpec) -> list[np.ndarray]:
    """One 1 x 3 x H x W float32 batch per record, preprocessed as the evaluation does."""
    transform = eval_transform(spec.size)
    return [transform(record_input(r, spec, image=load_image(r.path))).unsqueeze(0).numpy()
            for r in records]


def split_subset(data: str | Path, split: str | Path, subset: str) -> list[Record]:
    """The records of `subset` ('train', 'val' or 'test') of the split file `split` over the
    data set folder `data`; a `DataError` when there are none."""
    if not Path(split).is_file():
        raise DataError(f"No split file at {split}: pass --split (e.g. splits/busi.json).")
    records = split_records(load_records(data), load_split(split), subset)
    if not records:
        raise DataError(f"The {subset} subset of {split} has no images in {data}.")
    return records


def calibration_records(records: Sequence[Record], n: int, seed: int = 0) -> list[Record]:
    """`n` records drawn without replacement (seeded, so every run calibrates alike)."""
    order = np.random.default_rng(seed).permutation(len(records))[:n]
    return [records[i] for i in sorted(order)]


@contextlib.contextmanager
def _nncf_output_on_stderr() -> Iterator[None]:
    """NNCF's log lines and progress bars go to stderr while the block runs: stdout carries the
    benchmark's JSON lines."""
    handlers = [h for h in logging.getLogger("nncf").handlers
                if isinstance(h, logging.StreamHandler)]
    previous = [h.stream for h in handlers]
    for handler in handlers:  # not setStream: it flushes the old stream, which may be closed
        handler.stream = sys.stderr
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for handler, stream in zip(handlers, previous):
            handler.stream = stream


def quantise(model: Any, calibration: Sequence[np.ndarray],
             validation: Sequence[tuple[np.ndarray, int]] | None = None,
             max_drop: float = 1 - MIN_AGREEMENT) -> Any:
    """The int8 `openvino.Model` of `model` (an fp32 `openvino.Model`): plain post-training
    quantisation calibrated on `calibration` (batches), or, given `validation` ((batch, fp32
    label) pairs), NNCF's accuracy-aware quantisation that keeps the label agreement with fp32
    within `max_drop` of 1. Raises `QuantisationError` when NNCF is not installed."""
    if not nncf_available():
        raise QuantisationError(NNCF_MISSING)
    import nncf  # optional (NNCF): imported where used

    calibration_set = nncf.Dataset(list(calibration))
    if validation is None:
        with _nncf_output_on_stderr(), kept_signal_stack():
            return nncf.quantize(model, calibration_set, subset_size=len(calibration))

    def agreement(compiled: Any, items: Iterable[tuple[np.ndarray, int]]) -> float:
        pairs = [(int(np.argmax(compiled(x)[0])), label) for x, label in items]
        return sum(p == label for p, label in pairs) / len(pairs)

    with _nncf_output_on_stderr(), kept_signal_stack():
        return nncf.quantize_with_accuracy_control(
            model, calibration_set, nncf.Dataset(list(validation), lambda item: item[0]),
            agreement, max_drop=max_drop, subset_size=len(calibration))


def compile_for_cpu(model: Any, precision: str) -> Callable[[np.ndarray], np.ndarray]:
    """The CPU-compiled `model` (an `openvino.Model`) under the inference precision hint
    `precision` ('f32' or 'bf16'), as a function batch -> float32 logits."""
    compiled = compile_on_cpu(model, precision)
    return lambda batch: np.asarray(compiled(batch)[0], dtype=np.float32)


@dataclass(frozen=True)
class Agreement:
    """How a precision's predictions compare with fp32's on the same images."""

    label_agreement: float
    max_probability_diff: float
    malignant_sensitivity: float | None
    fp32_malignant_sensitivity: float | None
    accuracy: float

    @property
    def meets_rule(self) -> bool:
        """>= 99% of labels equal to fp32's and the same malignant sensitivity."""
        return (self.label_agreement >= MIN_AGREEMENT
                and self.malignant_sensitivity == self.fp32_malignant_sensitivity)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly figures (rounded), with the verdict."""
        def r(value: float | None) -> float | None:
            return None if value is None else round(value, 4)

        return {"label_agreement": r(self.label_agreement),
                "max_probability_diff": r(self.max_probability_diff),
                "malignant_sensitivity": r(self.malignant_sensitivity),
                "fp32_malignant_sensitivity": r(self.fp32_malignant_sensitivity),
                "accuracy": r(self.accuracy), "meets_rule": self.meets_rule}


def agreement(reference: np.ndarray, other: np.ndarray, truth: Sequence[int],
              classes: Sequence[str], temperature: float) -> Agreement:
    """Compare the logits `other` with the fp32 logits `reference` (N x classes) of images
    whose true class indices are `truth`, through the card's calibrated probabilities."""
    p_ref, p_other = softmax(reference, temperature), softmax(other, temperature)
    y_ref, y_other, y = p_ref.argmax(1), p_other.argmax(1), np.asarray(truth)

    def sensitivity(predicted: np.ndarray) -> float | None:
        if MALIGNANT not in classes or not (y == classes.index(MALIGNANT)).any():
            return None
        positive = y == classes.index(MALIGNANT)
        return float((predicted[positive] == y[positive]).mean())

    return Agreement(label_agreement=float((y_ref == y_other).mean()),
                     max_probability_diff=float(np.abs(p_ref - p_other).max()),
                     malignant_sensitivity=sensitivity(y_other),
                     fp32_malignant_sensitivity=sensitivity(y_ref),
                     accuracy=float((y_other == y).mean()))


def measure(loaded: LoadedModel, data: str | Path, split: str | Path, subset: str = "val",
            n_calibration: int = 120, n_latency: int = 30,
            emit: Callable[..., Any] = lambda figure, **values: None) -> bool:
    """Quantise the OpenVINO IR of `loaded` to int8 (calibrated on `n_calibration` training
    images of `split`), compare it with fp32 (and bf16 where the CPU has it) on `subset`, and
    time the forward pass at batch 1 of each in the same run; every figure goes to
    `emit(figure, **values)`. When the plain quantisation breaks the rule on `subset`, the
    accuracy-aware one is tried too. True when an int8 model meets the rule."""
    if not nncf_available():
        raise QuantisationError(NNCF_MISSING)
    import openvino as ov  # optional (OpenVINO): imported where used

    spec = InputSpec.from_card(loaded.card)
    classes = list(loaded.card.classes)
    train = calibration_records(split_subset(data, split, "train"), n_calibration)
    checked = split_subset(data, split, subset)
    calibration, inputs = record_batches(train, spec), record_batches(checked, spec)
    truth = [classes.index(r.label) for r in checked]
    fp32_model = ov.Core().read_model(
        openvino_ir(loaded.model, loaded.weights_id, (spec.size.crop, spec.size.crop)))
    forwards = {"fp32": compile_for_cpu(fp32_model, "f32")}
    if cpu_supports_bf16():
        forwards["bf16"] = compile_for_cpu(fp32_model, "bf16")
    logits = {name: np.concatenate([f(x) for x in inputs]) for name, f in forwards.items()}
    if "bf16" in logits:
        emit("bf16_agreement_with_fp32", subset=subset, n=len(checked),
             **agreement(logits["fp32"], logits["bf16"], truth, classes,
                         loaded.card.temperature).to_dict())
    # int8 layers run in int8; what stays unquantised runs in bf16 where the CPU has it
    rest = "bf16" if "bf16" in forwards else "f32"
    fp32_labels = [(x, int(label)) for x, label in zip(inputs, logits["fp32"].argmax(1))]
    met = False
    for name, validation in (("int8", None), ("int8_accuracy_control", fp32_labels)):
        start = time.perf_counter()
        int8_model = quantise(fp32_model, calibration, validation)
        seconds = time.perf_counter() - start
        forwards[name] = compile_for_cpu(int8_model, rest)
        logits[name] = np.concatenate([forwards[name](x) for x in inputs])
        result = agreement(logits["fp32"], logits[name], truth, classes, loaded.card.temperature)
        emit(f"{name}_agreement_with_fp32", subset=subset, n=len(checked),
             calibration=f"{len(train)} training images", non_int8_precision=rest,
             quantise_s=round(seconds, 1), **result.to_dict())
        met = result.meets_rule
        if met:
            break
    p50 = interleaved_p50(forwards, inputs[0], n_latency)
    emit("forward_latency_batch1", n=n_latency, image=checked[0].path.name, p50_ms=p50,
         speedup_over_fp32={name: round(p50["fp32"] / ms, 2) for name, ms in p50.items()
                            if name != "fp32"})
    return met
