import numpy as np
import torch

from bus_core.data.dataset import load_records
from bus_core.data.inputs import InputSpec
from bus_core.data.loader import RecordDataset
from bus_core.evaluation.evaluate import collect_logits, evaluate
from bus_core.models.build import load_model
from bus_core.runtime.device import choose_device


def test_tta_averages_each_image_with_its_mirror(tiny_model_dir, busi_dir):
    loaded = load_model(tiny_model_dir)
    records = load_records(busi_dir)[:5]
    dataset = RecordDataset(records, InputSpec.from_card(loaded.card), classes=loaded.card.classes)
    config = choose_device("cpu-fp32")
    model = loaded.model.eval()
    plain = collect_logits(model, dataset, config, batch_size=2)
    tta = collect_logits(model, dataset, config, batch_size=2, tta=True)
    with torch.inference_mode():
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        expected = ((model(images) + model(images.flip(-1))) / 2).numpy()
    np.testing.assert_allclose(tta, expected, atol=1e-4)
    assert not np.allclose(plain, tta, atol=1e-4)


def test_evaluate_records_whether_tta_was_used(tiny_model_dir, busi_dir):
    loaded = load_model(tiny_model_dir)
    records = load_records(busi_dir)[:6]
    assert evaluate(loaded, records, device="cpu-fp32", tta=True).metrics["tta"] is True
    assert evaluate(loaded, records, device="cpu-fp32").metrics["tta"] is False


def test_input_mode_override_shows_a_mask_model_leak_free_normals(tiny_model_dir, busi_dir,
                                                                  tmp_path):
    from bus_core.models.build import save_model
    from bus_core.models.card import new_card

    loaded = load_model(tiny_model_dir)
    card = new_card("tiny-mask", "densenet121", input_size={"resize": 40, "crop": 32},
                    input_mode="mask")
    mask_model = load_model(save_model(loaded.model, card, tmp_path / "mask"))
    normals = [r for r in load_records(busi_dir) if r.label == "normal"]
    leaky = evaluate(mask_model, normals, device="cpu-fp32")
    fair = evaluate(mask_model, normals, device="cpu-fp32", input_mode="mask-leakfree")
    assert leaky.metrics["input_mode"] == "mask" and fair.metrics["input_mode"] == "mask-leakfree"
    assert np.ptp(leaky.logits, axis=0).max() < 1e-4  # every normal is the same black image
    assert np.ptp(fair.logits, axis=0).max() > 1e-4
