import numpy as np
import torch

from bus_core.data.presets import (
    InputSize,
    denormalise,
    eval_transform,
    input_size_for,
    resize_shorter,
    train_transform,
)


def test_resize_shorter_keeps_aspect():
    image = np.zeros((100, 300, 3), np.uint8)
    assert resize_shorter(image, 50).shape == (50, 150, 3)


def test_eval_preset_shape_and_determinism():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (120, 90, 3), dtype=np.uint8)
    t = eval_transform(InputSize(64, 56))
    out = t(image)
    assert out.shape == (3, 56, 56) and out.dtype == torch.float32
    assert torch.equal(out, t(image))


def test_train_presets_are_random_but_shaped():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (120, 90, 3), dtype=np.uint8)
    for strong in (False, True):
        t = train_transform(InputSize(64, 56), strong=strong)
        outs = [t(image) for _ in range(4)]
        assert all(o.shape == (3, 56, 56) for o in outs)
        assert any(not torch.equal(outs[0], o) for o in outs[1:])


def test_inception_is_299():
    assert input_size_for("inception_v3") == InputSize(342, 299)
    assert input_size_for("densenet121") == InputSize(256, 224)


def test_denormalise_inverts_eval_crop():
    image = np.full((56, 56, 3), 100, np.uint8)
    back = denormalise(eval_transform(InputSize(56, 56))(image))
    assert np.abs(back.astype(int) - 100).max() <= 1
