"""Speed benchmark: `python -m bus_core.bench [--quick]` prints one JSON line per figure, every
figure measured in the same run on this machine (machines are noisy: compare ratios, not
absolute numbers across runs).

Paths compared:
- naive: CPU fp32, NCHW, eager model; the image is decoded and resized with plain PIL at full
  resolution on every call;
- pytorch: `predict.Predictor` with the PyTorch backend on the automatically chosen device
  (bf16 autocast and channels_last on CPUs with native bf16);
- optimised: `predict.Predictor` with the automatically chosen backend (OpenVINO on CPUs where
  it is installed, see `backends`), the same code the app and CLI run.
Both keep the model loaded between calls: model loading is measured separately, and
`cold_start` measures the first reading of `python -m bus_core predict` on an empty data folder
(conversion, compilation and the precision timing included) and that of a fresh process once
`python -m bus_core warm` has prepared the model, in subprocesses.

Every ratio comes from repetitions timed in turns in one run (A, B, A, B...): the median of the
per-pair ratios and its interquartile range (`ratio_stats`). The `machine` line gives the load
average; `--table FILE` writes the figures as a markdown speed table (machine, CPU flags, date)
into FILE, and refuses when the machine is busy (1-minute load above the CPU count) unless
`--force`.
For a two-stage model (`ModelCard.two_stage`, see `predict`), these figures are its
whole-image model's, which reads every image; `two_stage_latency` times the whole reading
(outline model, whole-image model, lesion model) with PyTorch and with the chosen backends, with
each stage's p50 (a first stage that shares its encoder runs as one network, and `apart` /
`apart_ratio` compare with its two models run apart; otherwise the outline and whole-image
models may run side by side, and `one_at_a_time` / `one_at_a_time_ratio` compare with them
run one after the other), and batch prediction serves the two-stage model.
On a CPU with native bf16, `openvino_precisions` times the OpenVINO forward pass at batch 1 in
fp32 and bf16 in turns (the choice `backends.choose_precision` makes at first compile).

Training (`training_pipeline`): images/s of the real input pipeline (synthetic PNG files decoded
once, `loader.PlanLoader` worker processes, copy to the device, `train.train_step`) against the
same step of the same model on random tensors already on the device, same batch size.

Batch prediction (`batch.predict_to_csv`: worker processes decode, batched forward passes of the
optimised path) is compared in images/s with the optimised path called one file at a time on
the same synthetic PNG files.

int8 (`--int8`, needs `pip install nncf==3.4.0`): instead of the figures above, the default
model's OpenVINO IR quantised with NNCF (`bus_core.runtime.int8`), compared with fp32 on a split
subset (`--subset`, default val): labels equal to fp32, largest probability difference, malignant
sensitivity, and the forward pass at batch 1 of fp32, bf16 (where the CPU has it) and int8
timed in turns in the same run.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io as _io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bus_core import atomic
from bus_core.clinic.cases import NewCase, open_store
from bus_core.clinic.worklist import PAGE_SIZE, Worklist, read_page
from bus_core.constants import CLASSES, IMAGENET_MEAN, IMAGENET_STD
from bus_core.data.dataset import Record, load_records
from bus_core.data.images import load_image
from bus_core.data.inputs import InputSpec
from bus_core.data.loader import (
    PlanLoader,
    RecordDataset,
    default_train_workers,
    epoch_plan,
    plan_batches,
)
from bus_core.data.presets import InputSize
from bus_core.data.roots import DEFAULT_SPLIT
from bus_core.data.splits import load_split, split_records
from bus_core.errors import BusError
from bus_core.inference.batch import DEFAULT_BATCH_SIZE, default_workers, predict_to_csv
from bus_core.inference.outline import Segmenter
from bus_core.inference.predict import Predictor
from bus_core.inference.warm import tidy_cache
from bus_core.metrics import softmax
from bus_core.models.build import LoadedModel, build_model, load_model
from bus_core.models.registry import active_model_path, active_segmenter_path, two_stage_folders
from bus_core.roles import Identity
from bus_core.runtime.backends import (
    PRECISIONS,
    OpenVinoForward,
    cache_dir,
    compile_on_cpu,
    cpu_name,
    folder_bytes,
    interleaved_p50,
    interleaved_times,
    openvino_ir,
    openvino_version,
)
from bus_core.runtime.device import (
    DeviceConfig,
    autocast,
    choose_device,
    cpu_supports_bf16,
    fp32_cpu,
    needs_grad_scaler,
    physical_cores,
    prepare_model,
    to_device,
)
from bus_core.runtime.int8 import NNCF_MISSING, nncf_available
from bus_core.runtime.int8 import measure as measure_int8
from bus_core.settings import default_dataset_dir
from bus_core.training.train import train_step


def emit(figure: str, **values: Any) -> dict[str, Any]:
    """Print one figure as a JSON line and return it."""
    line = {"figure": figure, **values}
    print(json.dumps(line), flush=True)
    return line


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50 and p95 of samples in milliseconds."""
    ms = sorted(s * 1000 for s in samples)
    return {"p50_ms": round(statistics.median(ms), 2),
            "p95_ms": round(ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))], 2)}


def timed(fn: Callable[[], Any], n: int, warmup: int = 2) -> list[float]:
    """Wall times of n calls of fn after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def ratio_stats(slow_ms: Sequence[float], fast_ms: Sequence[float]) -> dict[str, Any]:
    """The ratios slow / fast of repetitions timed in turns (pair i: the i-th of each): their
    median and interquartile range [q1, q3]."""
    ratios = [a / b for a, b in zip(slow_ms, fast_ms, strict=True) if b > 0]
    q1, median, q3 = np.percentile(ratios, [25, 50, 75])
    return {"median": round(float(median), 3), "iqr": [round(float(q1), 3), round(float(q3), 3)],
            "pairs": len(ratios)}


def ms_percentiles(ms: Sequence[float]) -> dict[str, float]:
    """`percentiles` of samples already in milliseconds."""
    return percentiles([m / 1000 for m in ms])


def busy(cpus: int | None = None) -> tuple[bool, tuple[float, float, float]]:
    """(whether the machine is busy: a 1-minute load average above its CPU count, the load
    averages over 1, 5 and 15 minutes); never busy where there is no load average."""
    try:
        load = os.getloadavg()
    except (AttributeError, OSError):
        return False, (0.0, 0.0, 0.0)
    return load[0] > (cpus or os.cpu_count() or 1), load


def cpu_flags() -> list[str]:
    """This CPU's flags that decide the speed of bf16: AMX and AVX512-BF16 (from /proc/cpuinfo
    where there is one)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])
    names = {"amx_tile": "AMX", "amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16",
             "avx512f": "AVX512"}
    return [name for flag, name in names.items() if flag in flags]


def naive_predict(model: torch.nn.Module, data: bytes, size: InputSize) -> np.ndarray:
    """Logits after decode + preprocess + forward the plain way: PIL at full size, fp32, NCHW
    (the card's fit: resize and centre-crop, or the whole image padded to a square)."""
    image = Image.open(_io.BytesIO(data)).convert("RGB")
    w, h = image.size
    if size.fit == "pad":
        scale = size.crop / max(w, h)
        inner = image.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                             Image.Resampling.BILINEAR)
        image = Image.new("RGB", (size.crop, size.crop))
        image.paste(inner, ((size.crop - inner.width) // 2, (size.crop - inner.height) // 2))
    else:
        scale = size.resize / min(w, h)
        image = image.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
        left, top = (image.width - size.crop) // 2, (image.height - size.crop) // 2
        image = image.crop((left, top, left + size.crop, top + size.crop))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    x = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.inference_mode():
        return model(x.unsqueeze(0)).numpy()


def write_synthetic_images(folder: Path, n: int) -> list[Path]:
    """`n` different 600 x 500 greyscale noise PNG files in `folder`."""
    folder.mkdir(parents=True)
    files = []
    for i in range(n):
        pixels = np.random.default_rng(i).integers(0, 255, (500, 600), dtype=np.uint8)
        files.append(folder / f"{i:05d}.png")
        Image.fromarray(pixels).save(files[-1])
    return files


def training_step(arch: str, config: DeviceConfig, batch: int, crop: int) -> Callable[[], None]:
    """One training step (forward, backward, Adam step) of a fresh model on a random batch."""
    torch.manual_seed(0)
    model = prepare_model(build_model(arch), config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, crop, crop)
    y = torch.randint(0, len(CLASSES), (batch,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(config):
            loss = torch.nn.functional.cross_entropy(model(to_device(x, config)).float(), y)
        loss.backward()
        optimizer.step()

    return step


WORKLIST_CASES = 5000
"""Cases in the store the `worklist` figure reads its pages from."""


def worklist_latency(database: str | None, folder: Path, n: int) -> dict[str, Any]:
    """Seconds to read the first page of the review worklist (its counts, the page of the
    most suspicious cases to review, the names for its filters) from a store of
    `WORKLIST_CASES` cases, and the last page of every case oldest first: `database`, an empty
    database to fill (default: a new SQLite file in `folder`)."""
    store = open_store(database or folder / "worklist.sqlite", images_dir=folder / "images")
    try:
        if store.count_cases():
            raise BusError("The worklist figure needs an empty database: it adds "
                           f"{WORKLIST_CASES} made-up cases.")
        rng = np.random.default_rng(0)
        image = np.zeros((8, 8), np.uint8)
        items = []
        for i in range(WORKLIST_CASES):
            p = rng.dirichlet(np.ones(len(CLASSES)))
            probabilities = dict(zip(CLASSES, p.tolist(), strict=True))
            items.append(NewCase(image=image, image_name=f"case{i}.png", model_name="bench",
                                 model_hash="0" * 64, probabilities=probabilities,
                                 predicted_label=CLASSES[int(np.argmax(p))],
                                 flagged=bool(p[CLASSES.index("malignant")] > 0.3)))
        store.add_cases(items, who=Identity("bench", frozenset({"clinician"})))

        def first_page() -> None:
            read_page(store, Worklist())
            store.distinct_people()

        last = Worklist(view="all", sort="oldest", page=WORKLIST_CASES // PAGE_SIZE)
        return {"cases": WORKLIST_CASES, "database": store.engine.dialect.name,
                "first_page": percentiles(timed(first_page, n)),
                "last_page": percentiles(timed(lambda: read_page(store, last), n))}
    finally:
        store.close()


def cold_start(model: Path, image: bytes, folder: Path, *, quick: bool) -> dict[str, Any]:
    """Seconds of `python -m bus_core predict IMAGE --json` in a new process on an empty data
    folder (so an empty OpenVINO cache): `first_reading_s`; then of `python -m bus_core warm`
    (`warm_s`: from an empty folder of its own, or with `quick` in the same folder after that
    reading) and of the same reading in a new process after it (`after_warmup_s`); the
    cache's size after."""
    file = folder / "image.png"
    folder.mkdir(parents=True, exist_ok=True)
    file.write_bytes(image)

    def run(data: Path, *command: str) -> float:
        env = {**os.environ, "BUS_DATA_DIR": str(data), "BUS_MODEL": str(model)}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bus_core", *command], env=env, check=True,
                       capture_output=True)
        return time.perf_counter() - start

    empty = folder / "empty"
    first = run(empty, "predict", str(file), "--json")
    warmed = empty if quick else folder / "warmed"
    warm_s = run(warmed, "warm")
    after = run(warmed, "predict", str(file), "--json")
    return {"first_reading_s": round(first, 1), "warm_s": round(warm_s, 1),
            "warm_from_empty_folder": not quick, "after_warmup_s": round(after, 1),
            "cache_mb": round(folder_bytes(warmed / "cache" / "openvino") / 1e6, 1)}


def pipeline_throughput(arch: str, config: DeviceConfig, size: InputSize, batch: int, steps: int,
                        folder: Path) -> dict[str, Any]:
    """Training images/s of the real input pipeline and of the model-only step (random tensors
    already on the device), same model and batch size, `steps` timed steps each after an
    untimed one (for the pipeline: the first step of an epoch after a first epoch, whose
    batch waits for the workers); and the seconds the one-off decoding of the
    `batch * (steps + 1)` PNG files took."""
    files = write_synthetic_images(folder, batch * (steps + 1))
    records = [Record(f.stem, f, CLASSES[i % len(CLASSES)]) for i, f in enumerate(files)]
    dataset = RecordDataset(records, InputSpec(size=size), train=True)
    torch.manual_seed(0)
    model = prepare_model(build_model(arch), config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(config.device.type, enabled=needs_grad_scaler(config))
    criterion = torch.nn.CrossEntropyLoss()

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        train_step(model, to_device(images, config),
                   labels.to(config.device, non_blocking=True), optimizer, scaler, criterion,
                   config)

    start = time.perf_counter()
    loader = PlanLoader(dataset, workers=default_train_workers(),
                        pin_memory=config.device.type == "cuda")
    decode_s = time.perf_counter() - start
    plans = [plan_batches(epoch_plan(dataset.labels, "none", epoch, 0), batch, seed=0,
                          epoch=epoch) for epoch in (0, 1)]
    for _, images, labels in loader.epoch(plans[0][:1]):  # starts the workers; warms up
        step(images, labels)
    for index, (_, images, labels) in enumerate(loader.epoch(plans[1])):
        step(images, labels)
        if index == 0:
            start = time.perf_counter()
    pipeline = batch * (len(plans[1]) - 1) / (time.perf_counter() - start)
    x = to_device(torch.randn(batch, 3, size.crop, size.crop), config)
    y = torch.randint(0, len(CLASSES), (batch,)).to(config.device)
    times = timed(lambda: step(x, y), steps, warmup=1)
    model_only = batch * len(times) / sum(times)
    return {"batch": batch, "crop": size.crop, "steps": steps, "workers": loader.workers,
            "decode_once_s": round(decode_s, 2), "pipeline_images_per_s": round(pipeline, 2),
            "model_only_images_per_s": round(model_only, 2),
            "ratio": round(pipeline / model_only, 3)}


def _test_images(args: argparse.Namespace) -> list[Path]:
    data = Path(args.data) if args.data else default_dataset_dir()
    split = Path(args.split)
    if data is None or not split.is_file():
        return []

    records = split_records(load_records(data), load_split(split), "test")
    return [r.path for r in records]


def _int8(loaded: LoadedModel, args: argparse.Namespace) -> int:
    """The `--int8` figures of `loaded`; 2 (after an error line) when they cannot be measured."""
    data = Path(args.data) if args.data else default_dataset_dir()
    if data is None:
        emit("error", message="The int8 measurement needs the BUSI images: pass --data.")
        return 2
    try:
        measure_int8(loaded, data, args.split, args.subset, n_calibration=120,
                     n_latency=10 if args.quick else 30, emit=emit)
    except BusError as exc:
        emit("error", message=str(exc))
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print its figures (and write the speed table with --table)."""
    parser = argparse.ArgumentParser(prog="python -m bus_core.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the active model)")
    parser.add_argument("--data", help="BUSI folder (default: ../shared/data/BUSI)")
    parser.add_argument("--split", default=str(DEFAULT_SPLIT))
    parser.add_argument("--segmenter", help="segmentation model folder (default: the bundled one)")
    parser.add_argument("--quick", action="store_true", help="small counts")
    parser.add_argument("--int8", action="store_true",
                        help="measure NNCF int8 quantisation against fp32 (needs nncf)")
    parser.add_argument("--subset", default="val", choices=("train", "val", "test"),
                        help="split subset the int8 figures are measured on (default val)")
    parser.add_argument("--no-cold-start", action="store_true",
                        help="leave out the cold_start figure (minutes on a small CPU)")
    parser.add_argument("--table", metavar="FILE",
                        help="write the figures as a markdown speed table into FILE (between "
                             f"{TABLE_START} and {TABLE_END}, else at its end)")
    parser.add_argument("--force", action="store_true",
                        help="write the --table even when the machine is busy")
    parser.add_argument("--worklist-database", metavar="URL",
                        help="an empty database (SQLAlchemy URL) for the worklist figure, "
                             "which fills it with made-up cases (default: a temporary SQLite "
                             "file)")
    args = parser.parse_args(argv)
    if args.int8 and not nncf_available():
        emit("error", message=NNCF_MISSING)
        return 2
    is_busy, load = busy()
    if args.table and is_busy and not args.force:
        emit("error", message=f"The machine is busy (load average {load[0]:.2f} over 1 minute, "
                              f"{os.cpu_count()} CPUs): no speed table written; wait until it "
                              "is quiet, or pass --force.")
        return 3

    n_latency, train_steps, n_agree, n_batch = (10, 2, 16, 32) if args.quick else \
        (50, 6, None, 256)
    pipeline_counts = (4, 3) if args.quick else (16, 8)  # batch size, timed steps
    fast = choose_device()
    figures = [emit("machine", cpu=cpu_name(), cpu_flags=cpu_flags(),
                    threads=torch.get_num_threads(), cpu_count=os.cpu_count(),
                    physical_cores=physical_cores(), load_average=[round(x, 2) for x in load],
                    busy=is_busy, date=datetime.date.today().isoformat(),
                    torch=torch.__version__, openvino=openvino_version(),
                    optimised_device=fast.to_dict(), quick=args.quick)]
    path = args.model or active_model_path()
    if path is None:
        emit("error", message="no model installed; pass --model")
        return 2
    start = time.perf_counter()
    loaded = load_model(path)
    served_path = Path(path)
    figures.append(emit("model_load", ms=round((time.perf_counter() - start) * 1000, 1),
                        model=loaded.card.name))
    served = Predictor(loaded, fast) if loaded.card.two_stage else None
    if served is not None:  # the figures below are the whole-image model's, which reads all
        path = two_stage_folders(loaded.path, loaded.card)[0]
        loaded = load_model(path)
        figures.append(emit("two_stage", served=served.card.name,
                            whole_image_model=loaded.card.name,
                            outline_model=served.outliner.card.name if served.outliner
                            else None))
    if args.int8:
        return _int8(loaded, args)

    images = _test_images(args)
    sample = images[0] if images else None
    if sample is None:
        rng = np.random.default_rng(0)
        buf = _io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (500, 600), dtype=np.uint8)).save(buf, "PNG")
        data = buf.getvalue()
    else:
        data = sample.read_bytes()
    image_name = str(sample.name) if sample else "synthetic 600x500"
    size = loaded.card.size

    if not args.no_cold_start:
        with tempfile.TemporaryDirectory(prefix="bus-bench-") as tmp:
            try:
                figures.append(emit("cold_start", model=served_path.name, image=image_name,
                                    **cold_start(served_path, data, Path(tmp), quick=args.quick)))
            except subprocess.CalledProcessError as exc:
                emit("cold_start", skipped=(exc.stderr or b"").decode(errors="replace")[-300:])

    naive_model = copy.deepcopy(loaded.model).eval()
    pytorch = Predictor(load_model(path), fast, backend="torch")
    start = time.perf_counter()
    predictor = Predictor(loaded, fast)
    figures.append(emit("backend", chosen=predictor.description,
                        ready_ms=round((time.perf_counter() - start) * 1000, 1)))
    if isinstance(predictor.forward, OpenVinoForward) and cpu_supports_bf16():
        xml = openvino_ir(predictor.model, loaded.weights_id, (size.crop, size.crop))
        pair = {p: compile_on_cpu(str(xml), p) for p in PRECISIONS}
        image = np.zeros((1, 3, size.crop, size.crop), dtype=np.float32)
        figures.append(emit("openvino_precisions",
                            forward_p50_ms=interleaved_p50(pair, image, n_latency),
                            chosen=predictor.forward.precision))
    times = interleaved_times({
        "naive": lambda: naive_predict(naive_model, data, size),
        "pytorch": lambda: pytorch.predict(load_image(data)),
        "optimised": lambda: predictor.predict(load_image(data))}, n_latency, warmup=2)
    figures.append(emit("latency_single_image",
                        **{name: ms_percentiles(ms) for name, ms in times.items()},
                        backend=predictor.description,
                        ratio=ratio_stats(times["naive"], times["optimised"]),
                        pytorch_ratio=ratio_stats(times["naive"], times["pytorch"]),
                        image=image_name))

    if served is not None:
        pytorch_served = Predictor(load_model(served.loaded.path), fast, backend="torch")
        # the other way of running the first stage: its two models apart (when it is one
        # network), else one model after the other (when they run side by side)
        other, other_name = (Predictor(load_model(served.loaded.path), fast, share=False),
                             "apart") if served.first_stage is not None else \
            (Predictor(load_model(served.loaded.path), fast, side_by_side=False),
             "one_at_a_time")
        stages: list[dict[str, float]] = []
        times = interleaved_times({
            "pytorch": lambda: pytorch_served.predict(load_image(data)),
            "optimised": lambda: stages.append(served.predict(load_image(data)).stages_ms),
            other_name: lambda: other.predict(load_image(data))}, n_latency, warmup=2)
        timed_stages = stages[-n_latency:]
        figures.append(emit(
            "two_stage_latency", **{name: ms_percentiles(ms) for name, ms in times.items()},
            stages_p50_ms={name: round(statistics.median(s[name] for s in timed_stages), 2)
                           for name in timed_stages[0]},
            side_by_side=served.side_by_side, shared_square=served.shared_square,
            one_network_first_stage=served.first_stage is not None,
            backend=served.description,
            outline_backend=served.outliner.forward.description if served.outliner else None,
            ratio=ratio_stats(times["pytorch"], times["optimised"]),
            **{f"{other_name}_ratio": ratio_stats(times[other_name], times["optimised"])},
            image=image_name))

    prediction = predictor.predict(load_image(data))
    cam_times = timed(lambda: predictor.explain(prediction), max(3, n_latency // 5), warmup=1)
    figures.append(emit("gradcam_latency", **percentiles(cam_times)))

    crop = size.crop
    steps = {"naive": training_step(loaded.card.arch, fp32_cpu(), 16, crop),
             "optimised": training_step(loaded.card.arch, fast, 16, crop)}
    times = interleaved_times(steps, train_steps, warmup=1)
    rates = {name: 16 * len(ms) / (sum(ms) / 1000) for name, ms in times.items()}
    figures.append(emit("training_throughput", batch=16,
                        naive_images_per_s=round(rates["naive"], 2),
                        optimised_images_per_s=round(rates["optimised"], 2),
                        ratio=ratio_stats(times["naive"], times["optimised"])))
    with tempfile.TemporaryDirectory(prefix="bus-bench-") as tmp:
        pipeline_size = InputSize(72, 64) if args.quick else size
        figures.append(emit(
            "training_pipeline", device=fast.to_dict(), image="synthetic 600x500 PNG files",
            **pipeline_throughput(loaded.card.arch, fast, pipeline_size, *pipeline_counts,
                                  Path(tmp) / "images")))

    if images:
        chosen = images[:n_agree] if n_agree else images
        same, max_diff = 0, 0.0
        for image_path in chosen:
            image = load_image(image_path)
            p_fast = predictor.predict(image).probabilities
            logits = naive_predict(naive_model, image_path.read_bytes(), size)
            ref = dict(zip(loaded.card.classes, softmax(logits, loaded.card.temperature)[0]))
            same += max(p_fast, key=p_fast.__getitem__) == max(ref, key=ref.__getitem__)
            max_diff = max(max_diff, max(abs(p_fast[c] - ref[c]) for c in ref))
        figures.append(emit("agreement_with_fp32", n=len(chosen), subset="BUSI test split",
                            label_agreement=round(same / len(chosen), 4),
                            max_probability_diff=round(max_diff, 4)))
    else:
        emit("agreement_with_fp32", skipped="no BUSI test split available")

    segmenter_path = args.segmenter or active_segmenter_path()
    if segmenter_path:
        segmenter = Segmenter.from_path(segmenter_path, device="cpu-fp32")
        image = load_image(data)
        seg_times = timed(lambda: segmenter.segment(image), max(3, n_latency // 2), warmup=1)
        figures.append(emit("segmentation_latency", model=segmenter.card.name,
                            **percentiles(seg_times), backend=segmenter.forward.description,
                            image=image_name))
    else:
        emit("segmentation_latency", skipped="no segmentation model installed")

    with tempfile.TemporaryDirectory(prefix="bus-bench-") as tmp:
        files = write_synthetic_images(Path(tmp) / "images", n_batch)
        start = time.perf_counter()
        reader = served or predictor  # the batch command serves the card as it is
        for file in files:
            reader.predict(load_image(file))
        one_by_one = n_batch / (time.perf_counter() - start)
        start = time.perf_counter()
        predict_to_csv([Path(tmp) / "images"], Path(tmp) / "results.csv", reader,
                       batch_size=DEFAULT_BATCH_SIZE)
        batched = n_batch / (time.perf_counter() - start)
    figures.append(emit(
        "batch_prediction_throughput", n=n_batch, image="synthetic 600x500 PNG files",
        model=reader.card.name, backend=reader.description, batch_size=DEFAULT_BATCH_SIZE,
        workers=default_workers(),
        one_by_one_images_per_s=round(one_by_one, 2), batch_images_per_s=round(batched, 2),
        ratio=round(batched / one_by_one, 2)))
    with tempfile.TemporaryDirectory() as temp:
        try:
            figures.append(emit("worklist", **worklist_latency(
                args.worklist_database, Path(temp), 5 if args.quick else 20)))
        except BusError as exc:
            emit("worklist", skipped=str(exc))
    tidied = tidy_cache()  # as the app does when it starts: what no installed model needs goes
    figures.append(emit("openvino_cache", folder=str(cache_dir()),
                        mb=round(tidied.size_bytes / 1e6, 1),
                        pruned_mb=round(tidied.freed_bytes / 1e6, 1),
                        pruned_entries=len(tidied.removed)))
    if args.table:
        write_table(Path(args.table), speed_table(figures))
        emit("table", written=args.table)
    return 0


TABLE_START, TABLE_END = "<!-- speed-table -->", "<!-- /speed-table -->"
"""The lines around the speed table `--table` writes into a file."""


def speed_table(figures: Sequence[dict[str, Any]]) -> str:
    """The figures of one run as markdown: the machine (CPU, its bf16 flags, cores, load) and
    the date, then one row per figure."""
    by_name = {line["figure"]: line for line in figures}
    machine = by_name["machine"]
    flags = ", ".join(machine["cpu_flags"]) or "no AVX512-BF16 or AMX"
    lines = [f"{machine['date']}, {machine['cpu']} ({flags}), {machine['cpu_count']} CPUs "
             f"({machine['physical_cores']} cores), load average "
             f"{machine['load_average'][0]:.2f}; torch {machine['torch']}, OpenVINO "
             f"{machine['openvino'] or 'not installed'}; "
             f"{'--quick' if machine['quick'] else 'full run'}"
             f"{' (machine busy: written with --force)' if machine['busy'] else ''}.", "",
             "| figure | value |", "| --- | --- |"]

    def ratio(r: dict[str, Any]) -> str:
        return f"{r['median']:.2f} (IQR {r['iqr'][0]:.2f}-{r['iqr'][1]:.2f}, {r['pairs']} pairs)"

    rows: list[tuple[str, str]] = []
    if "cold_start" in by_name and "first_reading_s" in by_name["cold_start"]:
        cold = by_name["cold_start"]
        rows.append(("first reading on an empty data folder / after `warm` (new process)",
                     f"{cold['first_reading_s']} s / {cold['after_warmup_s']} s "
                     f"(`warm` {cold['warm_s']} s)"))
    if "latency_single_image" in by_name:
        single = by_name["latency_single_image"]
        rows.append(("single image p50: naive / PyTorch / chosen backend",
                     f"{single['naive']['p50_ms']} / {single['pytorch']['p50_ms']} / "
                     f"{single['optimised']['p50_ms']} ms ({single['backend']})"))
        rows.append(("naive / chosen, per pair", ratio(single["ratio"])))
    if "two_stage_latency" in by_name:
        two = by_name["two_stage_latency"]
        stages = ", ".join(f"{k} {v} ms" for k, v in two["stages_p50_ms"].items())
        rows.append(("two-stage reading p50: PyTorch / chosen",
                     f"{two['pytorch']['p50_ms']} / {two['optimised']['p50_ms']} ms ({stages})"))
        rows.append(("two-stage PyTorch / chosen, per pair", ratio(two["ratio"])))
        if "one_at_a_time_ratio" in two:
            rows.append(("two-stage one model at a time / side by side, per pair",
                         ratio(two["one_at_a_time_ratio"])))
        if "apart_ratio" in two:
            rows.append(("two-stage first stage as two networks / as one, per pair",
                         ratio(two["apart_ratio"])))
    if "segmentation_latency" in by_name:
        outline = by_name["segmentation_latency"]
        rows.append(("outline model alone p50 / p95",
                     f"{outline['p50_ms']} / {outline['p95_ms']} ms ({outline['backend']})"))
    if "agreement_with_fp32" in by_name:
        agree = by_name["agreement_with_fp32"]
        rows.append((f"agreement with fp32 ({agree['subset']}, n={agree['n']})",
                     f"{agree['label_agreement']:.0%} of labels, largest probability "
                     f"difference {agree['max_probability_diff']}"))
    if "worklist" in by_name:
        work = by_name["worklist"]
        rows.append((f"review worklist, {work['cases']} cases ({work['database']}): first page "
                     "/ last page p50", f"{work['first_page']['p50_ms']} / "
                     f"{work['last_page']['p50_ms']} ms"))
    if "training_throughput" in by_name:
        train = by_name["training_throughput"]
        rows.append(("training images/s: naive / chosen device",
                     f"{train['naive_images_per_s']} / {train['optimised_images_per_s']}, "
                     f"ratio {ratio(train['ratio'])}"))
    if "openvino_cache" in by_name:
        cache = by_name["openvino_cache"]
        rows.append(("OpenVINO cache (after removing what no installed model needs)",
                     f"{cache['mb']} MB ({cache.get('pruned_mb', 0)} MB removed)"))
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines) + "\n"


def write_table(path: Path, table: str) -> None:
    """Put `table` between `TABLE_START` and `TABLE_END` in the file at `path` (those lines
    added at its end when it has none)."""
    text = path.read_text() if path.is_file() else ""
    block = f"{TABLE_START}\n{table}{TABLE_END}"
    if TABLE_START in text and TABLE_END in text:
        before, rest = text.split(TABLE_START, 1)
        text = before + block + rest.split(TABLE_END, 1)[1]
    else:
        text = f"{text.rstrip()}\n\n{block}\n" if text.strip() else f"{block}\n"
    atomic.write_text(path, text)


if __name__ == "__main__":
    raise SystemExit(main())
