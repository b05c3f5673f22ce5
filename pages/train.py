"""Train: set up a training run or a grid search, run it in the background, follow its progress,
cancel or resume it."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from bus_core.data.inputs import INPUT_MODES
from bus_core.data.loader import BALANCE_MODES
from bus_core.data.presets import input_size_for
from bus_core.errors import BusError, ModelError
from bus_core.metrics import METRIC_LABELS, fmt3
from bus_core.models.build import MIN_INPUT_SIZE, imagenet_cached
from bus_core.models.card import ARCHS, CARD_FILE, WEIGHTS_FILE
from bus_core.models.registry import (
    active_model_path,
    check_model_name,
    import_model,
    list_models,
)
from bus_core.runtime.device import DEVICE_CHOICES, choose_device
from bus_core.runtime.distributed import local_gpus
from bus_core.settings import data_dir, default_dataset_dir, user_models_dir
from bus_core.training.jobs import (
    CONFIRM_LONGER_THAN_S,
    Job,
    current_job,
    delete_failed_run,
    expected_duration,
    is_failed_run,
    last_job,
    resume_job,
    start_training,
    start_tuning,
)
from bus_core.training.runs import fmt_duration, last_event, progress_fraction, progress_text
from bus_core.training.train import OPTIMIZERS, SCHEDULERS, TrainConfig, check_config
from bus_core.training.tune import DEFAULT_GRID, combinations, grid_values, run_name
from ui.auth import require_page
from ui.common import md_escape, show_error, start_job
from ui.data_inputs import (
    data_summary,
    default_split_text,
    image_count,
    matching_split,
    resolve_path,
    sources_from_text,
)
from ui.state import keep_widget_state
from ui.training import epoch_figure, step_figure

WHO = require_page("train")

POLL_S = 2
MODE_LABELS = {"full": "Full image", "mask": "Lesion mask crop (leaks the label: comparison only)",
               "mask-leakfree": "Lesion mask crop, leak-free",
               "lesion-context": "Lesion with its surroundings (box around the outline)"}
BALANCE_LABELS = {"augment": "Augmented copies of minority classes",
                  "weights": "Class-weighted loss", "sampler": "Weighted sampling",
                  "source-class": "Weighted sampling, each source's classes alike",
                  "none": "None"}
INIT_LABELS = {"imagenet": "ImageNet (pretrained)", "checkpoint": "A model from the registry",
               "random": "Random"}
STATE_ICONS = {"done": ":material/check_circle:", "cancelled": ":material/cancel:",
               "killed": ":material/warning:", "failed": ":material/error:"}
# Widget keys of the form (kept while a job hides it), and those never kept: the buttons and
# the confirmation of a long job.
FORM_PREFIXES = ("train_", "grid_")
ACTION_KEYS = ("train_start", "grid_start", "grid_keep", "train_long_ok", "grid_long_ok")
# The test figures shown when a run ends (labels: `metrics.METRIC_LABELS`).
TEST_KEYS = ("accuracy", "macro_f1", "malignant_sensitivity", "malignant_specificity",
             "auc_malignant", "ece")


# --- settings ---------------------------------------------------------------------------------

def form_values(job: Job) -> dict[str, Any]:
    """The form's widget values that describe `job`'s settings (a grid search: its grid too)."""
    config = job.train_config()
    init_kind = config.init if config.init in ("imagenet", "random") else "checkpoint"
    values: dict[str, Any] = {
        "train_data": "\n".join(config.data), "train_arch": config.arch,
        "train_mode": config.input_mode, "train_init": init_kind,
        "train_split_kind": "Saved split file" if config.split else "New group-disjoint split",
        f"train_resize_{config.arch}": config.size.resize,
        f"train_crop_{config.arch}": config.size.crop, "train_device": config.device,
        "train_seed": config.seed, "train_scheduler": config.scheduler,
        "train_wd": config.weight_decay, "train_monitor": config.monitor,
        "train_patience": config.patience, "train_max_per_class": config.max_per_class or 0}
    if config.split:
        values["train_split_file"] = config.split
    if job.kind == "train":
        values.update({"train_optimizer": config.optimizer, "train_lr": config.lr,
                       "train_batch": config.batch_size, "train_epochs": config.epochs,
                       "train_balance": config.balance, "train_name": Path(job.out).name,
                       "train_all_gpus": config.nproc_per_node > 1})
    else:
        grid = job.grid or DEFAULT_GRID
        values.update({"grid_lrs": ", ".join(f"{v:g}" for v in grid.get("lr", [])),
                       "grid_batches": ", ".join(map(str, grid.get("batch_size", []))),
                       "grid_optimizers": list(grid.get("optimizer", [])),
                       "grid_epochs": config.epochs, "grid_balance": config.balance,
                       "grid_name": Path(job.out).name})
    return values


def show_settings_of(job: Job) -> None:
    """Once per job for each visitor: the form shows that job's settings, so what is
    drawn (and started next) is what ran last, not the defaults."""
    if st.session_state.get("_train_form_of") == job.started:
        return
    st.session_state["_train_form_of"] = job.started
    values = form_values(job)
    st.session_state.setdefault("_train_form", {}).update(values)
    st.session_state.update(values)


def data_settings() -> list[str]:
    """Data folders / manifests, with their class counts (or why they cannot be read)."""
    default = default_dataset_dir()
    text = st.text_area("Data: folders or CSV manifests, one per line",
                        value=str(default) if default else "", key="train_data", height=80,
                        help="A BUSI-layout folder (normal/, benign/, malignant/ with *_mask "
                             "files) or a CSV manifest path,label[,mask][,patient].")
    try:
        sources = sources_from_text(text)
    except BusError as exc:
        show_error(exc)
        return []
    if sources:
        try:
            st.caption(data_summary(tuple(sources)))
        except BusError as exc:
            show_error(exc)
    return sources


def model_settings() -> dict[str, Any]:
    """Architecture, input mode and initialisation."""
    arch_col, mode_col, init_col = st.columns(3)
    arch = arch_col.selectbox("Architecture", ARCHS, key="train_arch")
    mode = mode_col.selectbox("Input", INPUT_MODES, format_func=MODE_LABELS.get,
                              key="train_mode")
    active = (active_model_path() or Path()).resolve()
    same = sorted((e for e in list_models() if e.card.arch == arch),  # the likeliest start first
                  key=lambda e: (e.card.input_mode != mode, e.path.resolve() != active))
    offline_default = "checkpoint" if same and not imagenet_cached(arch) else "imagenet"
    init_kind = init_col.selectbox("Initialisation", list(INIT_LABELS),
                                   index=list(INIT_LABELS).index(offline_default),
                                   format_func=INIT_LABELS.get, key="train_init",
                                   help="Without internet access and without ImageNet weights "
                                        "in the torch cache, start from a registry model.")
    if mode == "mask":
        st.warning("**Label leak.** BUSI normal images have empty masks, so this mode turns "
                   "every normal image black and the model learns 'black = normal': its normal-"
                   "class figures say nothing about ultrasound. Use the leak-free mode.",
                   icon=":material/warning:")
    elif mode == "mask-leakfree":
        st.caption("The model sees the masked lesion crop; images without a lesion get a random "
                   "crop of their tissue, so the class is not given away. At diagnosis a lesion "
                   "mask is required.")
    elif mode == "lesion-context":
        st.caption("The model sees the box around the lesion outline with the tissue around it, "
                   "not blacked out; images without a lesion give a window of their tissue. At "
                   "diagnosis any outline of the lesion will do (painted, suggested or a box).")
    init = init_kind
    if init_kind == "imagenet":
        cached = imagenet_cached(arch)
        st.caption("ImageNet weights are " + (
            "in the torch hub cache." if cached else
            "downloaded by torchvision when the run starts: this needs internet access or a "
            "copy in the torch hub cache (~/.cache/torch/hub)."))
    elif init_kind == "checkpoint":
        if not same:
            st.error(f"No {arch} model in the registry to start from.", icon=":material/error:")
            init = ""
        else:
            entry = st.selectbox("Start from", same, key="train_init_model",
                                 format_func=lambda e: f"{e.card.name} ({e.card.created[:10]})")
            init = str(entry.path)
    return {"arch": arch, "input_mode": mode, "init": init}


def split_setting(sources: list[str]) -> str | None | bool:
    """The split file to use, None for a new split, or False when the chosen file is missing
    or not allowed."""
    default = matching_split(sources)
    kind = st.radio("Split", ["New group-disjoint split", "Saved split file"],
                    index=1 if default else 0, horizontal=True, key="train_split_kind",
                    help="A new split is 70/15/15, stratified by class, with near-duplicate "
                         "images and patients kept on one side.")
    if kind.startswith("New"):
        st.caption("A new 70/15/15 split is made and saved with the model (train/split.json).")
        return None
    typed = st.text_input("Split file", value=default or default_split_text(),
                          key="train_split_file")
    try:
        path = resolve_path(typed)
    except BusError as exc:
        show_error(exc)
        return False
    if not Path(path).is_file():
        st.error(f"The split file {md_escape(Path(path).name)} does not exist: choose a new "
                 "split, or another split file.", icon=":material/error:")
        return False
    return path


def advanced_settings(arch: str) -> dict[str, Any]:
    """Input size, device, scheduler, regularisation, early stopping, seed."""
    std = input_size_for(arch)
    with st.expander("Advanced"):
        c1, c2, c3, c4 = st.columns(4)
        resize = c1.number_input("Resize (shorter side, px)", 16, 1024, std.resize,
                                 key=f"train_resize_{arch}")
        smallest = MIN_INPUT_SIZE[arch]
        crop = c2.number_input(f"Input size (crop, px; at least {smallest})", smallest, 1024,
                               std.crop, key=f"train_crop_{arch}",
                               help=f"{arch} cannot take a smaller input.")
        device = c3.selectbox("Device", DEVICE_CHOICES, key="train_device")
        seed = c4.number_input("Seed", 0, 2**31 - 1, 0, key="train_seed")
        c1, c2, c3, c4 = st.columns(4)
        scheduler = c1.selectbox("LR schedule", SCHEDULERS, index=SCHEDULERS.index("cosine"),
                                 key="train_scheduler")
        weight_decay = c2.number_input("Weight decay", 0.0, 1.0, 0.0, format="%g",
                                       key="train_wd")
        monitor = c3.selectbox("Best model by (validation)", ["macro_f1", "accuracy", "loss",
                                                               "balanced_accuracy",
                                                               "malignant_sensitivity",
                                                               "auc_malignant"],
                               key="train_monitor")
        patience = c4.number_input("Early stop after (epochs, 0 = never)", 0, 1000, 0,
                                   key="train_patience")
        per_class = st.columns(2)[0].number_input(
            "Use at most N images per class (0 = all; quick trials)", 0, 100000, 0,
            key="train_max_per_class")
    if resize < crop:
        st.warning("The resize is smaller than the input size: images are upscaled.")
    return {"resize": int(resize), "crop": int(crop), "device": device, "seed": int(seed),
            "scheduler": scheduler, "weight_decay": float(weight_decay), "monitor": monitor,
            "patience": int(patience), "max_per_class": int(per_class) or None}


def show_device(choice: str) -> bool:
    """Which device will run the job; False when the choice is not available here."""
    try:
        st.info(f"Runs on **{choose_device(choice).description}**.", icon=":material/memory:")
        return True
    except BusError as exc:
        show_error(exc)
        return False


# --- starting ---------------------------------------------------------------------------------

def output_folder(label: str, root: Path, default: str, key: str) -> Path | None:
    """The folder a run writes, from a name; None (after saying why) when it cannot be used."""
    name = st.text_input(label, value=default, key=key)
    try:
        folder = root / check_model_name(name)
    except ModelError as exc:
        show_error(exc)
        return None
    if is_failed_run(folder):
        st.caption(f"'{md_escape(folder.name)}' holds only a failed run: starting replaces it.")
    elif folder.exists():
        if not st.checkbox(f"'{md_escape(folder.name)}' exists: replace it",
                           key=f"{key}_replace"):
            st.caption("Choose another name, or tick to replace it.")
            return None
    return folder


def long_run_confirmed(config: TrainConfig, runs: int, key: str) -> bool:
    """States the expected training time when the last job measured the speed; a job expected
    to take longer than an hour needs a tick first. False until then."""
    try:
        images = image_count(tuple(config.data))
    except BusError:
        return True  # the data's own message is shown above
    seconds = expected_duration(config, images, last_job(), runs)
    if seconds is None:
        return True
    text = f"Expected to take about {fmt_duration(seconds)} (at the speed of the last run here)."
    if seconds <= CONFIRM_LONGER_THAN_S:
        st.caption(text)
        return True
    return st.checkbox(f"{text} Start it anyway", key=key)


def launch(start: Any, force: bool) -> None:
    """Start a job (`start(force)`), then show it; a busy machine or bad settings are shown."""
    if start_job(lambda: start(force), "The job could not start"):
        st.session_state.pop("train_dismissed", None)
        st.rerun()


def single_run_tab(base: dict[str, Any], ready: bool, force: bool) -> None:
    """Optimiser, learning rate, batch size, epochs, balancing and the model name; Start."""
    c1, c2, c3, c4 = st.columns(4)
    optimizer = c1.selectbox("Optimiser", OPTIMIZERS, key="train_optimizer")
    lr = c2.number_input("Learning rate", 1e-7, 1.0, 1e-4, step=1e-5, format="%g",
                         key="train_lr")
    batch = c3.number_input("Batch size", 2, 512, 16, key="train_batch")
    epochs = c4.number_input("Epochs", 1, 1000, 10, key="train_epochs")
    balance_col, name_col = st.columns(2)
    balance = balance_col.selectbox("Class balancing", BALANCE_MODES,
                                    format_func=BALANCE_LABELS.get, key="train_balance")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
    with name_col:
        folder = output_folder("Model name", user_models_dir(), f"{base['arch']}-{stamp}",
                               "train_name")
    if folder is not None:
        st.caption(f"Saved among your models as '{md_escape(folder.name)}'.")
    gpus = local_gpus(base["device"])
    all_gpus = gpus > 1 and st.checkbox(
        f"All {gpus} GPUs of this machine", key="train_all_gpus",
        help=f"One training process per GPU (torchrun). The batch size is per GPU: each step "
             f"trains on {gpus} × the batch size.")
    config = TrainConfig(**base, out=str(folder), name=folder.name if folder else None,
                         optimizer=optimizer, lr=float(lr), batch_size=int(batch),
                         epochs=int(epochs), balance=balance,
                         nproc_per_node=gpus if all_gpus else 1)
    confirmed = ready and long_run_confirmed(config, 1, "train_long_ok")
    if st.button("Start training", type="primary", icon=":material/play_arrow:",
                 disabled=not ready or folder is None or not confirmed, key="train_start"):
        launch(lambda f: start_training(config, who=WHO, force=f), force)


def grid_tab(base: dict[str, Any], ready: bool, force: bool) -> None:
    """The grid (default: the published method's) and its results once run."""
    st.caption("One training run per combination, ranked on the validation subset only; test "
               "figures are recorded but never used to choose.")
    c1, c2, c3 = st.columns(3)
    lrs = c1.text_input("Learning rates", ", ".join(f"{v:g}" for v in DEFAULT_GRID["lr"]),
                        key="grid_lrs")
    batches = c2.text_input("Batch sizes", ", ".join(map(str, DEFAULT_GRID["batch_size"])),
                            key="grid_batches")
    optimizers = c3.multiselect("Optimisers", OPTIMIZERS, default=DEFAULT_GRID["optimizer"],
                                key="grid_optimizers")
    c1, c2 = st.columns(2)
    epochs = c1.number_input("Epochs per run", 1, 1000, 5, key="grid_epochs")
    balance = c2.selectbox("Class balancing", BALANCE_MODES, format_func=BALANCE_LABELS.get,
                           key="grid_balance")
    try:
        grid = {"lr": grid_values("lr", lrs), "batch_size": grid_values("batch_size", batches),
                "optimizer": list(optimizers)}
    except ValueError:
        st.error("Learning rates and batch sizes are comma-separated numbers.",
                 icon=":material/error:")
        return
    n_runs = len(combinations(grid))
    st.caption(f"{n_runs} runs × {int(epochs)} epochs.")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M")
    folder = output_folder("Search name", data_dir() / "grid-search", f"grid-{stamp}",
                           "grid_name")
    if folder is not None:
        st.caption(f"Each run is saved in the search '{md_escape(folder.name)}'; the best can "
                   "then be added to the registry.")
    config = TrainConfig(**base, out=str(folder), epochs=int(epochs), balance=balance)
    confirmed = ready and long_run_confirmed(config, n_runs, "grid_long_ok")
    if st.button("Start grid search", type="primary", icon=":material/grid_view:",
                 disabled=not ready or folder is None or n_runs == 0 or not confirmed,
                 key="grid_start"):
        launch(lambda f: start_tuning(config, grid, who=WHO, force=f), force)


def settings_and_start(force: bool) -> None:
    """The shared settings, then the single-run and grid-search tabs."""
    sources = data_settings()
    model = model_settings()
    split = split_setting(sources)
    advanced = advanced_settings(model["arch"])
    device_ok = show_device(advanced["device"])
    base = {"data": sources, "split": split or None, **model, **advanced}
    try:
        check_config(TrainConfig(**base, out=""))
        combinable = True
    except BusError as exc:
        show_error(exc)
        combinable = False
    ready = bool(sources) and split is not False and bool(model["init"]) and device_ok \
        and combinable
    single, grid = st.tabs(["Single run", "Grid search"])
    with single:
        single_run_tab(base, ready, force)
    with grid:
        grid_tab(base, ready, force)


# --- following a job --------------------------------------------------------------------------

def run_label(job: Job) -> str:
    """'Training <name>' or 'Grid search <name>, run i of n: <run>'."""
    name = Path(job.out).name
    if job.kind == "train":
        return f"Training **{md_escape(name)}**"
    runs = combinations(job.grid or DEFAULT_GRID)
    current = job.progress_path().parent.parent.name
    names = [run_name(c) for c in runs]
    index = names.index(current) + 1 if current in names else 1
    return f"Grid search **{md_escape(name)}**, run {index} of {len(runs)}: `{current}`"


def progress_view(job: Job, events: list[dict[str, Any]], running: bool) -> None:
    """Progress bar (with the time left while `running`), the latest figures, and the live
    curves."""
    st.progress(progress_fraction(events), text=progress_text(events, running))
    step, epoch = last_event(events, "step"), last_event(events, "epoch")
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Epoch", f"{step['epoch']}/{step['epochs']}" if step else "–")
    c2.metric("Training loss", fmt3(step["mean_loss"]) if step else "–")
    c3.metric("Training accuracy", fmt3(step["accuracy"]) if step else "–")
    c4.metric("Validation macro-F1", fmt3((epoch.get("val") or {}).get("macro_f1"))
              if epoch else "–")
    left, right = st.columns(2)
    for column, figure in ((left, step_figure(events)), (right, epoch_figure(events))):
        if figure is not None:
            column.plotly_chart(figure, config={"displayModeBar": False})


def results_view(job: Job) -> None:
    """The grid-search table so far (sortable), best validation score first once done."""
    rows = job.results()
    if not rows:
        return
    st.markdown("##### Results")
    table = pd.DataFrame(rows)
    table["model"] = table["model"].map(lambda p: Path(p).name)
    numbers = {c: st.column_config.NumberColumn(format="%.3f") for c in table.columns
               if c.startswith(("val_", "test_"))}
    numbers["lr"] = st.column_config.NumberColumn(format="%g")
    numbers["training_time_s"] = st.column_config.NumberColumn("time (s)", format="%.0f")
    st.dataframe(table, hide_index=True, column_config=numbers, key="grid_results")


def log_view(job: Job) -> None:
    """The end of the job's output."""
    with st.expander("Output log"):
        st.code(job.log_tail() or "(empty)", language=None)


def live_view(job: Job) -> None:
    """A running job, refreshed every few seconds; Cancel."""
    @st.fragment(run_every=POLL_S)
    def refresh() -> None:
        if not job.is_alive():
            st.rerun()  # the whole page then shows how it ended
        st.markdown(run_label(job))
        progress_view(job, job.events(), running=not job.cancel_requested())
        if job.kind == "tune":
            results_view(job)
        if not job.cancel_requested() and st.button("Cancel", icon=":material/stop:",
                                                    key="job_cancel"):
            job.cancel(who=WHO)
        if job.cancel_requested():
            job.cancel(who=WHO)  # reaches a run that started meanwhile; harmless otherwise
            st.info("Stopping after the current step…", icon=":material/hourglass_top:")
        log_view(job)

    refresh()


def outcome(job: Job, status: str, events: list[dict[str, Any]]) -> None:
    """How a finished job ended and what can be done next."""
    icon = STATE_ICONS[status]
    where = last_event(events, "step")
    at = f" at epoch {where['epoch']}, step {where['step']}" if where else ""
    if status == "done":
        st.success(f"Finished. The model is saved among your models as "
                   f"'{md_escape(Path(job.out).name)}'.", icon=icon)
    elif status == "cancelled":
        st.info(f"Cancelled{at}. Its checkpoint is kept: Resume continues from there.",
                icon=icon)
    elif status == "killed":
        st.warning(f"The process stopped without finishing{at} (killed, out of memory or the "
                   "machine restarted). Its last checkpoint is kept: Resume continues from there.",
                   icon=icon)
    else:
        error = last_event(events, "error")
        st.error("The job failed: " + (md_escape(error["message"]) if error else
                                       "it stopped before training began (see the log)."),
                 icon=icon)


def test_figures(events: list[dict[str, Any]]) -> None:
    """The finished model's test metrics (from its last progress event)."""
    done = last_event(events, "done") or {}
    test = done.get("test") or {}
    if not test:
        return
    st.markdown(f"##### Test subset (n={test.get('n')})")
    columns = st.columns(len(TEST_KEYS))
    for column, key in zip(columns, TEST_KEYS):
        column.metric(METRIC_LABELS[key], fmt3(test.get(key)))
    st.caption(f"Trained for {fmt_duration(done.get('train_time_s'))}; best epoch "
               f"{done.get('best_epoch')}.")


def keep_best(job: Job) -> None:
    """Copy the best grid-search model into the registry."""
    rows = job.results()
    best = Path(rows[0]["model"]) if rows else None
    if best is None or not (best / CARD_FILE).is_file():
        return
    if st.button(f"Add the best run ({md_escape(best.name)}) to the registry", key="grid_keep",
                 icon=":material/inventory_2:"):
        try:
            path = import_model({name: (best / name).read_bytes()
                                 for name in (WEIGHTS_FILE, CARD_FILE)}, who=WHO)
            st.success(f"Added as {md_escape(path.name)}.", icon=":material/check_circle:")
        except BusError as exc:
            show_error(exc)


def finished_view(job: Job, status: str) -> None:
    """A job that no longer runs: outcome, figures, Resume / activate / dismiss."""
    events = job.events()
    st.markdown(run_label(job))
    outcome(job, status, events)
    if job.kind == "train":
        progress_view(job, events, running=False)
        if status == "done":
            test_figures(events)
    else:
        results_view(job)
    c1, c2, c3 = st.columns([1, 1, 2])
    if status in ("cancelled", "killed") and c1.button(
            "Resume", type="primary", icon=":material/play_arrow:", key="job_resume"):
        launch(lambda f: resume_job(job, who=WHO, force=f), False)
    if status == "done" and job.kind == "train" and WHO.can("manage_models"):
        with c3:
            st.page_link("pages/models.py", label="Make it the active model in the Model "
                         "registry (compared with the active one first)", icon=":material/star:")
    if status == "done" and job.kind == "tune":
        with c3:
            keep_best(job)
    if status == "failed" and is_failed_run(job.out) and c1.button(
            "Delete the run folder", icon=":material/delete:", key="job_delete",
            help="Removes the run (its log and settings); its name is free again."):
        try:
            delete_failed_run(job.out, who=WHO)
            st.session_state["train_dismissed"] = job.started
            st.rerun()
        except BusError as exc:
            show_error(exc)
    if c2.button("Dismiss", icon=":material/close:", key="job_dismiss"):
        st.session_state["train_dismissed"] = job.started
        st.rerun()
    log_view(job)


def job_panel(job: Job) -> None:
    """The latest job, live while it runs."""
    with st.container(border=True):
        status = job.status()
        if status == "running":
            live_view(job)
        else:
            finished_view(job, status)


running = current_job()
latest = running or last_job()
if latest is not None:
    show_settings_of(latest)
keep_widget_state("_train_form", FORM_PREFIXES, ACTION_KEYS)
st.title("Train")
st.caption("Training runs in the background on this machine: you can leave this page or reload "
           "it and come back. One job runs at a time.")

if latest is not None and st.session_state.get("train_dismissed") != latest.started:
    job_panel(latest)

force = False
if running is not None:
    force = st.checkbox("Start another job anyway (experts: both jobs share this machine)",
                        key="train_force")
    if not force:
        st.caption(f"Started {time.strftime('%H:%M', time.localtime(running.started))} · "
                   f"process {running.pid}")
        st.stop()

st.subheader("New run")
settings_and_start(force)
