"""Getting a model ready before anyone asks for a reading: loading it, converting and compiling
its networks for this computer (`backends`: the OpenVINO conversion and the precision choice
are kept in the cache, so this is slow once per model and CPU) in a background thread.

    warm(model folder, segmenter folder) --thread--> Predictor (+ Segmenter)   k of n networks

One preparation per model folder, weights version, outline model and device in a process:
a reading asked for while the model is being prepared waits for that preparation
(`Warmup.result`) instead of starting another. The app starts it when it starts and whenever the
active model changes (activation, retraining, import); `python -m bus_core warm` does it for
deployment scripts. Once a model is ready, the OpenVINO cache is kept to the installed models
(`tidy_cache`).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Collection, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bus_core.errors import ModelError
from bus_core.inference.outline import Segmenter
from bus_core.inference.predict import Predictor, network_count
from bus_core.models.build import file_sha256, load_model
from bus_core.models.card import WEIGHTS_FILE, read_card
from bus_core.models.registry import (
    active_model_path,
    active_segmenter_path,
    list_models,
    no_model_message,
    two_stage_folders,
)
from bus_core.runtime.backends import CacheReport, prune_cache
from bus_core.runtime.device import DeviceConfig, choose_device

State = Literal["preparing", "ready", "failed"]
log = logging.getLogger(__name__)

KEEP = 3
"""Prepared models a process keeps (the oldest finished ones beyond this are let go)."""


@dataclass(frozen=True)
class WarmProgress:
    """Where a preparation stands: `done` of `total` networks ready, the last one ready, and
    the error of a failed one."""

    model: str
    done: int
    total: int
    state: State = "preparing"
    last: str = ""
    error: str = ""

    @property
    def fraction(self) -> float:
        """The share of the networks ready, in [0, 1]."""
        return self.done / self.total if self.total else 1.0

    def sentence(self) -> str:
        """The progress for a person, e.g. 'Preparing the model for this computer: 2 of 3
        networks'."""
        if self.state == "failed":
            return f"{self.model} could not be prepared: {self.error}"
        if self.state == "ready":
            return f"{self.model} is ready ({self.total} of {self.total} networks)."
        return (f"Preparing the model for this computer: {self.done} of {self.total} "
                f"network{'s' if self.total != 1 else ''}")


class Abandoned(Exception):
    """A preparation stopped because its program ended."""


@dataclass(frozen=True)
class Prepared:
    """A model ready to read: its predictor and the outline model that suggests outlines
    (None when none was asked for)."""

    predictor: Predictor
    segmenter: Segmenter | None


class Warmup:
    """The preparation of one model (and outline model) in a background thread; a future of
    its `Prepared`. Start it with `warm`."""

    def __init__(self, model_dir: Path, segmenter_dir: Path | None,
                 device: str | DeviceConfig, backend: str | None) -> None:
        """Reads the cards (a `ModelError` for an unusable folder); `start` runs the rest."""
        self.model_dir, self.segmenter_dir = model_dir, segmenter_dir
        self._device, self._backend = device, backend
        card = read_card(model_dir)
        self._shares_outliner = bool(card.two_stage) and segmenter_dir is not None and \
            two_stage_folders(model_dir, card)[1].resolve() == segmenter_dir.resolve()
        total = network_count(model_dir, card) + (segmenter_dir is not None
                                                  and not self._shares_outliner)
        self._progress = WarmProgress(card.name, 0, total)
        self._changed = threading.Condition()
        self._result: Prepared | None = None
        self._cache: CacheReport | None = None
        self._error: BaseException | None = None
        # never a daemon, even when started from one (the app's script threads are): a process
        # ending while a daemon thread is inside torch or OpenVINO aborts; `_ready` stops the
        # preparation at the next network instead
        self._thread = threading.Thread(target=self._run, daemon=False,
                                        name=f"warm-{card.name}")

    def start(self) -> Warmup:
        """Start the preparation in its thread; returns self."""
        self._thread.start()
        return self

    def _ready(self, network: str) -> None:
        """One more network is ready; stops the preparation (`Abandoned`) once the program's
        main thread has ended."""
        if not threading.main_thread().is_alive():
            raise Abandoned("The program ended before the model was prepared.")
        with self._changed:
            self._progress = WarmProgress(self._progress.model, self._progress.done + 1,
                                          self._progress.total, last=network)
            self._changed.notify_all()

    def _run(self) -> None:
        """Load and compile every network; keep the result or the error."""
        state: State
        try:
            predictor = Predictor(load_model(self.model_dir), self._device, self._backend,
                                  on_network=self._ready)
            segmenter = None
            if self._shares_outliner:
                segmenter = predictor.outliner
            elif self.segmenter_dir is not None:
                segmenter = self._segmenter(self.segmenter_dir)
            result, state, error = Prepared(predictor, segmenter), "ready", ""
        except BaseException as exc:  # kept for `result`, which raises it in the caller
            result, state, error = None, "failed", str(exc)
            self._error = exc
        with self._changed:
            self._result = result
            old = self._progress
            done = old.total if state == "ready" else old.done
            self._progress = WarmProgress(old.model, done, old.total, state, old.last, error)
            self._changed.notify_all()
        if result is not None:  # after the readers are served: it may wait for the cache's lock
            self._cache = self._tidy(result)

    def _segmenter(self, folder: Path) -> Segmenter | None:
        """The outline model at `folder`, or None after a log line when it cannot be used (the
        classifier still can; the app says why when an outline is asked for)."""
        try:
            segmenter = Segmenter(load_model(folder), backend=self._backend)
        except Exception as exc:  # a broken outline model leaves the classifier usable
            log.warning("The outline model %s could not be prepared (%s).", folder, exc)
            segmenter = None
        self._ready(segmenter.card.name if segmenter else folder.name)
        return segmenter

    @staticmethod
    def _tidy(prepared: Prepared) -> CacheReport | None:
        """`tidy_cache`, keeping the networks of `prepared` whether installed or not; None
        after a log line when the cache cannot be tidied."""
        predictor = prepared.predictor
        networks = [predictor, predictor.whole, predictor.outliner, prepared.segmenter]
        try:
            return tidy_cache({n.loaded.weights_id for n in networks if n is not None})
        except (OSError, ModelError) as exc:
            log.warning("The OpenVINO cache could not be tidied (%s).", exc)
            return None

    def cache_report(self) -> CacheReport | None:
        """What keeping the OpenVINO cache to the installed models (and this model) did once
        the model was ready (waits for it); None when the preparation failed or the cache
        could not be tidied."""
        self._thread.join()
        return self._cache

    def progress(self) -> WarmProgress:
        """Where the preparation stands now."""
        with self._changed:
            return self._progress

    def done(self) -> bool:
        """True once the preparation has finished, ready or failed."""
        return self.progress().state != "preparing"

    def wait(self, seen: WarmProgress | None = None, timeout: float | None = None
             ) -> WarmProgress:
        """The progress once it differs from `seen` (None: from the progress now) or the
        preparation has finished, or after `timeout` seconds."""
        with self._changed:
            before = seen or self._progress
            self._changed.wait_for(lambda: self._progress != before
                                   or self._progress.state != "preparing", timeout)
            return self._progress

    def result(self) -> Prepared:
        """The prepared model, once ready (waits); raises the preparation's error."""
        with self._changed:
            self._changed.wait_for(lambda: self._progress.state != "preparing")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


_lock = threading.Lock()
_warmups: OrderedDict[Hashable, Warmup] = OrderedDict()


def warm(model_dir: str | Path | None = None, segmenter_dir: str | Path | None = None, *,
         device: str | DeviceConfig = "auto", backend: str | None = None) -> Warmup:
    """The preparation of the model folder `model_dir` (default: the active model) and of the
    outline model `segmenter_dir` (None: none), started now unless this process already has
    one for the same folders, weights versions, device and backend that has not failed.
    Returns at once; raises
    `ModelError` when there is no model or its card cannot be read (an outline model whose
    card cannot be read is left out)."""
    folder = Path(model_dir) if model_dir else active_model_path()
    if folder is None:
        raise ModelError(no_model_message())
    folder = folder.resolve()
    seg = Path(segmenter_dir).resolve() if segmenter_dir else None
    try:
        seg_weights = read_card(seg).weights_sha256 if seg else ""
    except ModelError:
        seg, seg_weights = None, ""
    config = device if isinstance(device, DeviceConfig) else choose_device(device)
    key = (folder, read_card(folder).weights_sha256, seg, seg_weights, config, backend)
    with _lock:
        warmup = _warmups.get(key)
        if warmup is None or warmup.progress().state == "failed":  # a failure is tried again
            warmup = _warmups[key] = Warmup(folder, seg, config, backend).start()
            finished = [k for k, w in _warmups.items() if w.done()]
            for old in finished[:max(0, len(_warmups) - KEEP)]:
                del _warmups[old]
        _warmups.move_to_end(key)
        return warmup


def warm_active(*, device: str | DeviceConfig = "auto", backend: str | None = None) -> Warmup:
    """`warm` of the active model and the active outline model (what the app serves)."""
    return warm(active_model_path(), active_segmenter_path(), device=device, backend=backend)


def installed_weights() -> set[str]:
    """The weights sha256 of every installed model (bundled and the user's), and of the
    active model and outline model wherever they are."""
    folders = [entry.path for entry in list_models()]
    folders += [p for p in (active_model_path(), active_segmenter_path()) if p is not None]
    weights = set()
    for folder in folders:
        try:
            sha = read_card(folder).weights_sha256
        except ModelError:
            continue
        weights.add(sha or file_sha256(Path(folder) / WEIGHTS_FILE))
    return weights


def tidy_cache(also_keep: Collection[str] = ()) -> CacheReport:
    """Remove from the OpenVINO cache what no installed model needs, nor the weights
    `also_keep` (`backends.prune_cache`)."""
    return prune_cache(installed_weights() | set(also_keep))
