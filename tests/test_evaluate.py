import numpy as np
import torch

from bus_core.dataset import load_records
from bus_core.device import choose_device
from bus_core.evaluate import collect_logits, evaluate
from bus_core.inputs import InputSpec
from bus_core.loader import RecordDataset
from bus_core.models import load_model


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
