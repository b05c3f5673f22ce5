"""What training does for scanners it has not seen: scanner-style and ultrasound augmentation,
MixStyle, sampling balanced over sources and classes, weight averaging, the training-time
limit, and scoring a left-out source (val+test)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from bus_core.data.augment import intensity, scanner_style
from bus_core.data.dataset import Record, load_records
from bus_core.data.inputs import InputSpec
from bus_core.data.loader import RecordDataset, epoch_plan, sampling_weights
from bus_core.data.presets import InputSize
from bus_core.data.splits import make_split, split_records
from bus_core.errors import DataError, ModelError
from bus_core.models.build import build_model
from bus_core.training.averaging import WeightAverage, warmed_decay
from bus_core.training.mixstyle import MixStyle, mixing_partners
from bus_core.training.runs import next_epoch_fits
from bus_core.training.train import check_config, config_from_args, get_args_parser, train
from tests.training.test_train import tiny_config


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_scanner_style_is_seeded_and_changes_depth_and_colour():
    x = torch.full((3, 40, 30), 0.5)
    a, b = scanner_style(x, _gen(1)), scanner_style(x, _gen(1))
    assert torch.equal(a, b) and not torch.equal(a, scanner_style(x, _gen(2)))
    assert 0 <= float(a.min()) and float(a.max()) <= 1
    rows = a.mean(dim=(0, 2))
    assert float(rows.max() - rows.min()) > 0.01  # a gain curve over depth
    channels = a.mean(dim=(1, 2))
    assert float(channels.max() - channels.min()) > 0.001  # a tint
    assert torch.equal(scanner_style(torch.zeros(3, 8, 8), _gen(3)), torch.zeros(3, 8, 8))


def test_intensity_adds_the_style_only_when_asked():
    x = torch.rand(3, 32, 32, generator=_gen(0))
    plain, styled = intensity(x, _gen(5)), intensity(x, _gen(5), style=True)
    assert torch.equal(plain, intensity(x, _gen(5)))
    assert not torch.equal(plain, styled)


def test_ultrasound_augmentation_of_training_inputs(busi_dir):
    records = load_records(busi_dir)[:2]
    spec = InputSpec(size=InputSize(40, 32, "pad"))
    plain = RecordDataset(records, spec, train=True)
    strong = RecordDataset(records, spec, train=True, ultrasound=1.0, style=True)

    def item(dataset: RecordDataset, seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return dataset[0][0]

    assert torch.equal(item(strong, 4), item(strong, 4))  # seeded by the batch's seed
    assert not torch.equal(item(strong, 4), item(strong, 5))
    assert not torch.equal(item(strong, 4), item(plain, 4))
    assert item(strong, 4).shape == item(plain, 4).shape == (3, 32, 32)


def test_scanner_style_needs_a_strength_in_train(busi_dir, tmp_path):
    with pytest.raises(DataError, match="--ultrasound-augment"):
        check_config(tiny_config(busi_dir, tmp_path / "m", style_augment=True))
    check_config(tiny_config(busi_dir, tmp_path / "m", style_augment=True,
                             ultrasound_augment=1.0))


def test_weight_average_follows_the_closed_form():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    average = WeightAverage(model, decay=0.9)
    assert average.module is not model
    for value in (1.0, 1.0):
        with torch.no_grad():
            model.weight.fill_(value)
        average.update()
    # the first update copies the weights; each later one keeps 0.9 of the average
    assert torch.allclose(average.module.weight, torch.ones(1, 2))
    with torch.no_grad():
        model.weight.fill_(2.0)
    average.update()
    assert torch.allclose(average.module.weight, torch.full((1, 2), 0.9 * 1 + 0.1 * 2))
    restored = WeightAverage(model, decay=0.9)
    restored.load_state_dict(average.state_dict())
    assert torch.allclose(restored.module.weight, average.module.weight)
    assert WeightAverage(model, decay=0).module is model
    with pytest.raises(ValueError):
        WeightAverage(model, decay=1.0)


def test_weight_average_with_warm_up_follows_its_own_steps_early():
    model = nn.Linear(2, 1, bias=False)
    average = WeightAverage(model, decay=0.9, warmup=True)
    fixed = WeightAverage(model, decay=0.9)
    expected = 0.0
    for step, value in enumerate((0.0, 1.0, 2.0)):
        with torch.no_grad():
            model.weight.fill_(value)
        average.update()
        fixed.update()
        # the first update copies; update n (n earlier ones) keeps min(0.9, (1+n)/(10+n))
        decay = warmed_decay(0.9, step)
        expected = value if step == 0 else decay * expected + (1 - decay) * value
        assert torch.allclose(average.module.weight, torch.full((1, 2), expected))
    assert warmed_decay(0.9, 1) == pytest.approx(2 / 11)
    assert warmed_decay(0.9, 10_000) == 0.9
    # without warm-up the starting weights (0) still weigh 0.9 ** 2 of the average
    assert float(average.module.weight.detach()[0, 0]) > float(fixed.module.weight.detach()[0, 0])
    assert torch.allclose(fixed.module.weight, torch.full((1, 2), 0.9 * 0.1 * 1 + 0.1 * 2))
    restored = WeightAverage(model, decay=0.9, warmup=True)
    restored.load_state_dict(average.state_dict())
    with torch.no_grad():
        model.weight.fill_(3.0)
    restored.update()
    average.update()  # the count of updates comes back with the checkpoint
    assert torch.allclose(restored.module.weight, average.module.weight)


def test_ema_warm_up_needs_an_average(busi_dir, tmp_path):
    base = ["--data", str(busi_dir), "--out", str(tmp_path / "m")]
    assert config_from_args(get_args_parser().parse_args(
        base + ["--ema", "0.99", "--ema-warmup"])).ema_warmup
    with pytest.raises(DataError, match="--ema"):
        check_config(tiny_config(busi_dir, tmp_path / "m", ema_warmup=True))
    check_config(tiny_config(busi_dir, tmp_path / "m", ema=0.99, ema_warmup=True))


@pytest.mark.parametrize("limit,done,spent,fits", [
    (0, 3, 1e9, True),  # no limit
    (1, 0, 0, True),  # nothing measured yet
    (1, 2, 40, True),  # 20 s an epoch: the third ends at 60 s
    (1, 2, 41, False),  # the third would end at 61.5 s
])
def test_next_epoch_fits(limit, done, spent, fits):
    assert next_epoch_fits(limit, spent, done) is fits


def test_val_plus_test_is_the_images_a_model_has_not_seen(busi_dir):
    records = load_records(busi_dir)
    split = make_split(records, seed=0)
    both = split_records(records, split, "val+test")
    assert [r.id for r in both] == split.val + split.test
    with pytest.raises(DataError, match="several joined by"):
        split.subset("val+nothing")


@pytest.mark.slow
def test_a_run_with_averaging_augmentation_and_a_time_limit(busi_dir, tmp_path):
    config = tiny_config(busi_dir, tmp_path / "m", epochs=3, ema=0.9, ultrasound_augment=1.0,
                         style_augment=True, time_limit=1e-9)
    result = train(config)
    hyper = result.card.hyperparameters
    assert result.status == "done" and hyper["epochs_trained"] == 1  # stopped by the limit
    assert hyper["ema"] == 0.9 and hyper["style_augment"] and hyper["ultrasound_augment"] == 1
    assert np.isfinite(result.card.temperature)


def _styled(means: list[float], stds: list[float]) -> torch.Tensor:
    """Feature maps (one image per mean/std) whose every channel has exactly that mean and
    standard deviation (population), over one shared pattern."""
    pattern = torch.randn(1, 3, 6, 6, generator=_gen(0))
    pattern = (pattern - pattern.mean((2, 3), keepdim=True)) / pattern.std(
        (2, 3), keepdim=True, unbiased=False)
    return torch.cat([pattern * s + m for m, s in zip(means, stds)])


def test_mixstyle_is_identity_in_eval_mode():
    x = _styled([0, 0, 5, 5], [1, 1, 3, 3])
    mixing = MixStyle(p=1.0).eval()
    assert torch.equal(mixing(x), x)


def test_mixstyle_mixes_the_statistics_of_images_of_other_sources():
    x = _styled([0, 0, 5, 5], [1, 1, 3, 3])
    mixing = MixStyle(p=1.0, alpha=1.0).train()
    mixing.domains = torch.tensor([0, 0, 1, 1])
    torch.manual_seed(0)
    y = mixing(x)
    assert y.shape == x.shape
    mean, std = y.mean((2, 3)), y.std((2, 3), unbiased=False)
    # the content (each map normalised) stays; the style is lam * own + (1 - lam) * partner's
    assert torch.allclose((y - mean[..., None, None]) / std[..., None, None],
                          (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True,
                                                                     unbiased=False), atol=1e-4)
    partner_share = torch.cat([mean[:2] / 5, (5 - mean[2:]) / 5])  # 1 - lam of each image
    assert torch.allclose(partner_share, torch.cat([(std[:2] - 1) / 2, (3 - std[2:]) / 2]),
                          atol=1e-4)  # the same lam for mean and std: the partner is (5, 3)
    assert bool(((partner_share > 1e-3) & (partner_share < 1 - 1e-3)).all())


@pytest.mark.parametrize("seed", range(5))
def test_mixing_partners_are_of_other_sources_when_the_batch_has_several(seed):
    torch.manual_seed(seed)
    domains = torch.tensor([0, 0, 1, 1, 1, 2])
    assert bool((domains[mixing_partners(domains, 6)] != domains).all())
    assert sorted(mixing_partners(torch.zeros(6, dtype=torch.long), 6).tolist()) == \
        list(range(6))
    assert sorted(mixing_partners(None, 6).tolist()) == list(range(6))


def test_mixstyle_leaves_the_network_and_its_inference_unchanged():
    torch.manual_seed(0)
    model = build_model("densenet121")
    x = torch.rand(4, 3, 32, 32)
    keys = list(model.state_dict())
    model.train()
    trained_plain = model(x)
    with torch.no_grad():
        plain = model.eval()(x)
    handles = MixStyle(p=1.0).attach(model.features)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain)
    assert not torch.allclose(model.train()(x), trained_plain)  # training inputs are mixed
    for handle in handles:
        handle.remove()


def test_mixstyle_option_is_a_share_of_batches_and_needs_a_densenet(busi_dir, tmp_path):
    base = ["--data", "d", "--out", "o"]
    assert config_from_args(get_args_parser().parse_args(base + ["--mixstyle", "0.5"])) \
        .mixstyle == 0.5
    assert config_from_args(get_args_parser().parse_args(base)).mixstyle == 0
    for bad in ("1.5", "-0.1", "often"):
        with pytest.raises(SystemExit):
            get_args_parser().parse_args(base + ["--mixstyle", bad])
    with pytest.raises(ModelError, match="densenet121"):
        check_config(tiny_config(busi_dir, tmp_path / "m", arch="resnet50", mixstyle=0.5))


def _expected_draws(weights: np.ndarray, cells: list[tuple[int, int]]) -> dict:
    n = len(cells)
    return {cell: n * sum(w for w, c in zip(weights, cells) if c == cell) for cell in set(cells)}


def test_source_class_sampling_draws_every_cell_as_often():
    sources = [0] * 10 + [1] * 4 + [2] * 3
    labels = [0, 1, 1, 2, 2, 2, 2, 2, 2, 2] + [1, 2, 2, 2] + [0, 1, 2]
    draws = _expected_draws(sampling_weights(labels, sources), list(zip(sources, labels)))
    assert len(draws) == 8 and np.allclose(list(draws.values()), len(labels) / 8)
    by_class = _expected_draws(sampling_weights(labels), [(0, y) for y in labels])
    assert np.allclose(list(by_class.values()), len(labels) / 3)


def test_source_class_balance_of_one_source_is_class_balance():
    labels = [0, 1, 1, 2, 2, 2, 2]
    assert np.array_equal(sampling_weights(labels, [3] * 7), sampling_weights(labels))
    plans = [epoch_plan(labels, balance, 2, 0, sources=[0] * 7)
             for balance in ("sampler", "source-class")]
    assert plans[0] == plans[1]


def test_source_class_balance_is_an_option_and_numbers_the_sources(tmp_path):
    args = get_args_parser().parse_args(["--data", "a", "--data", "b", "--out", "o",
                                         "--balance", "source-class"])
    assert config_from_args(args).balance == "source-class"
    records = [Record(f"{s}/{i}.png", tmp_path / f"{i}.png", "benign", source=s)
               for i, s in enumerate(["B", "A", "B", "C"])]
    assert RecordDataset(records, InputSpec()).source_ids == [1, 0, 1, 2]


@pytest.mark.slow
def test_a_run_with_mixstyle_and_source_class_balance(busi_dir, tmp_path, monkeypatch):
    seen = []  # (training, batch size, source ids given) of each call of MixStyle
    forward = MixStyle.forward

    def spy(self: MixStyle, x: torch.Tensor) -> torch.Tensor:
        seen.append((self.training, len(x), None if self.domains is None else len(self.domains)))
        return forward(self, x)

    monkeypatch.setattr(MixStyle, "forward", spy)
    config = tiny_config(busi_dir, tmp_path / "m", mixstyle=0.5, balance="source-class")
    result = train(config)
    assert result.status == "done"
    assert seen and all(training and n == given for training, n, given in seen)
    assert result.card.hyperparameters["mixstyle"] == 0.5
    assert result.card.hyperparameters["balance"] == "source-class"
    saved = load_file(tmp_path / "m" / "model.safetensors")
    assert set(saved) == set(build_model("densenet121").state_dict())
