from collections import Counter

import numpy as np
import pytest
import torch

from bus_core.data.dataset import load_records
from bus_core.data.inputs import InputSpec
from bus_core.data.loader import PlanLoader, RecordDataset, class_weights, epoch_plan, plan_batches
from bus_core.data.presets import InputSize


def test_augment_balances_classes_with_strong_copies():
    labels = [0] * 2 + [1] * 6 + [2] * 3
    plan = epoch_plan(labels, "augment", epoch=0, seed=0)
    counts = Counter(labels[item.index] for item in plan)
    assert counts == {0: 6, 1: 6, 2: 6}
    assert sum(item.strong for item in plan) == 18 - 11
    assert all(not item.strong for item in plan if labels[item.index] == 1)


def test_plans_are_reproducible_and_change_per_epoch():
    labels = [0, 1, 1, 2, 2, 2]
    assert epoch_plan(labels, "augment", 3, 7) == epoch_plan(labels, "augment", 3, 7)
    assert epoch_plan(labels, "none", 0, 7) != epoch_plan(labels, "none", 1, 7)
    assert sorted(i.index for i in epoch_plan(labels, "weights", 0, 0)) == list(range(6))


def test_sampler_prefers_rare_classes():
    labels = [0] * 90 + [1] * 10
    plan = epoch_plan(labels, "sampler", 0, 0)
    rare = sum(labels[i.index] == 1 for i in plan)
    assert len(plan) == 100 and rare > 30


def test_class_weights_inverse_frequency_and_absent_classes():
    w = class_weights([1, 1, 1, 2])
    assert torch.allclose(w, torch.tensor([1.0, 4 / 6, 4 / 2]))


def test_dataset_modes(busi_dir):
    records = load_records(busi_dir)
    size = InputSize(40, 32)
    for mode in ("full", "mask", "mask-leakfree"):
        ds = RecordDataset(records, InputSpec(mode=mode, size=size))
        x, y = ds[0]
        assert x.shape == (3, 32, 32) and 0 <= y < 3
    normal = [i for i, r in enumerate(records) if r.label == "normal"][0]
    leaky = RecordDataset(records, InputSpec(mode="mask", size=size))
    assert leaky.input_image(normal).max() == 0  # the leak: a black image
    free = RecordDataset(records, InputSpec(mode="mask-leakfree", size=size))
    assert free.input_image(normal).max() > 0
    # eval inputs are deterministic, training leak-free crops vary
    assert np.array_equal(free.input_image(normal), free.input_image(normal))
    train = RecordDataset(records, InputSpec(mode="mask-leakfree", size=size), train=True)
    crops = [train.input_image(normal) for _ in range(4)]
    assert any(c.shape != crops[0].shape or not np.array_equal(c, crops[0]) for c in crops[1:])


def _train_set(busi_dir) -> RecordDataset:
    records = load_records(busi_dir)[2:]  # classes of unequal sizes: strong copies are drawn
    return RecordDataset(records, InputSpec(size=InputSize(40, 32)), train=True)


def _epoch(loader, batches):
    return [(step, images.clone(), labels.clone()) for step, images, labels in
            loader.epoch(batches)]


def test_plan_batches_cut_steps_drop_a_batch_of_one_and_resume_alike():
    plan = epoch_plan([0, 1, 2] * 3, "none", epoch=0, seed=0)
    batches = plan_batches(plan, 4, seed=0, epoch=0)
    assert [b.step for b in batches] == [0, 1] and [len(b.items) for b in batches] == [4, 4]
    assert plan_batches(plan, 4, seed=0, epoch=0, start=1) == batches[1:]
    assert plan_batches(plan, 4, seed=0, epoch=1)[0].seed != batches[0].seed
    assert plan_batches(plan, 4, seed=0, epoch=0, rank=1)[0].seed != batches[0].seed


@pytest.mark.slow
def test_worker_processes_give_the_batches_of_the_training_process(busi_dir):
    dataset = _train_set(busi_dir)
    plan = epoch_plan(dataset.labels, "augment", epoch=0, seed=0)
    batches = plan_batches(plan, 4, seed=0, epoch=0)
    in_process = _epoch(PlanLoader(dataset, workers=0), batches)
    in_workers = _epoch(PlanLoader(_train_set(busi_dir), workers=2), batches)
    assert [s for s, _, _ in in_process] == [b.step for b in batches]
    for (s0, x0, y0), (s1, x1, y1), batch in zip(in_process, in_workers, batches):
        assert s0 == s1 and torch.equal(y0, y1) and torch.equal(x0, x1)
        assert y0.tolist() == [dataset.label_of(item) for item in batch.items]
    assert any(item.strong for b in batches for item in b.items)
    torch.manual_seed(123)  # the batches do not depend on the caller's random state
    assert torch.equal(_epoch(PlanLoader(dataset, workers=0), batches[:1])[0][1], in_process[0][1])


def test_files_are_decoded_once_before_the_workers_start(busi_dir, monkeypatch):
    import bus_core.data.loader

    decoded = []
    load = bus_core.data.loader.load_image
    monkeypatch.setattr(bus_core.data.loader, "load_image", lambda p: decoded.append(p) or load(p))
    dataset = _train_set(busi_dir)
    loader = PlanLoader(dataset, workers=1)
    assert sorted(decoded) == sorted(r.path for r in dataset.records)

    def no_decoding(path):
        raise AssertionError(f"{path} decoded again")

    monkeypatch.setattr(bus_core.data.loader, "load_image", no_decoding)
    for epoch in (0, 1):  # the worker forked after the patch: it must never decode
        plan = epoch_plan(dataset.labels, "augment", epoch=epoch, seed=0)
        assert len(_epoch(loader, plan_batches(plan, 4, seed=0, epoch=epoch))) > 1
