import numpy as np
import pytest
import torch

from bus_core.inference.cam import compute_cam, overlay
from bus_core.models.build import build_model, gradcam_layer


@pytest.fixture(scope="module")
def densenet():
    torch.manual_seed(0)
    return build_model("densenet121").eval()


def test_cam_shape_range(densenet):
    x = torch.randn(3, 64, 64)
    for method in ("gradcam", "gradcam++"):
        heat = compute_cam(densenet, gradcam_layer(densenet, "densenet121"), x, 1, method)
        assert heat.shape == (64, 64) and heat.dtype == np.float32
        assert heat.min() >= 0 and heat.max() <= 1


def test_target_activations_are_not_modified_in_place(densenet):
    """The hooked tensor must equal a copy taken at hook time: on a GPU the library copies
    activations to the CPU at once, on a CPU it keeps a view, so an in-place op after the
    hook (torchvision's ReLU after norm5) would make the maps differ between devices."""
    seen = {}

    def hook(module, inputs, output):
        seen["view"] = output
        seen["copy"] = output.clone()

    layer = gradcam_layer(densenet, "densenet121")
    handle = layer.register_forward_hook(hook)
    densenet(torch.randn(1, 3, 64, 64))
    handle.remove()
    assert torch.equal(seen["view"], seen["copy"])


def test_torchvision_norm5_would_have_been_modified():
    """Documents why the target layer is not features.norm5 of torchvision's own DenseNet."""
    import torchvision

    model = torchvision.models.densenet121(num_classes=3).eval()
    seen = {}
    handle = model.features.norm5.register_forward_hook(
        lambda m, i, o: seen.update(view=o, copy=o.clone()))
    model(torch.randn(1, 3, 64, 64))
    handle.remove()
    assert not torch.equal(seen["view"], seen["copy"])


def test_cam_same_in_channels_last_bf16_model_copy(densenet):
    """The map of the optimised (channels_last) model equals the plain one's."""
    import copy

    x = torch.randn(3, 64, 64)
    layer = gradcam_layer(densenet, "densenet121")
    ref = compute_cam(densenet, layer, x, 2)
    fast = copy.deepcopy(densenet).to(memory_format=torch.channels_last)
    out = compute_cam(fast, gradcam_layer(fast, "densenet121"),
                      x.unsqueeze(0).contiguous(memory_format=torch.channels_last), 2)
    assert np.abs(out - ref).max() < 1e-3


def test_overlay_blends():
    image = np.zeros((10, 12, 3), np.uint8)
    heat = np.ones((5, 6), np.float32)
    assert np.array_equal(overlay(image, heat, 0.0), image)
    full = overlay(image, heat, 1.0)
    assert full.shape == image.shape and full.max() > 0
    with pytest.raises(ValueError):
        overlay(image, heat, 1.5)


def test_method_ids_and_display_names():
    from bus_core.inference.cam import CAM_LABELS, method_id

    assert method_id("Grad-CAM++") == "gradcam++" and method_id("gradcam") == "gradcam"
    assert method_id(None) == "gradcam" and method_id("nonsense") == "gradcam"
    assert set(CAM_LABELS) == {"gradcam", "gradcam++"}


@pytest.mark.parametrize("target", [0, 1, 2])
def test_closed_form_gradcam_equals_the_library(densenet, target):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(target)
    x = torch.randn(1, 3, 64, 80)
    layer = gradcam_layer(densenet, "densenet121")
    with GradCAM(model=densenet, target_layers=[layer]) as library:
        expected = library(input_tensor=x, targets=[ClassifierOutputTarget(target)])[0]
    ours = compute_cam(densenet, layer, x[0], target)
    assert ours.shape == expected.shape == (64, 80)
    assert np.abs(ours - expected).max() < 1e-3
