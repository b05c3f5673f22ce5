from collections import Counter

import numpy as np
import torch

from bus_core.dataset import load_records
from bus_core.inputs import InputSpec
from bus_core.loader import RecordDataset, class_weights, epoch_plan
from bus_core.transforms import InputSize


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
