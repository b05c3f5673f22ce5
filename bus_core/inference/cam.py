"""Grad-CAM and Grad-CAM++ heat maps (pytorch-grad-cam) and their overlays.

The target layer of every architecture is one whose output is never modified in place after
the hook sees it (see `build.gradcam_layer`), so the map is the same on CPU and GPU. Maps are
computed in fp32 on the model's device.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.image import scale_cam_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from bus_core.models.build import DenseNetClassifier, pools_into_linear

CAM_LABELS: dict[str, str] = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++"}
"""CAM method ids (what cases and the CLI use) and their display names."""
_CAM_CLASSES: dict[str, type] = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}


def method_id(name: str | None, default: str = "gradcam") -> str:
    """The method id of an id or a display name ('Grad-CAM++' -> 'gradcam++'; cases saved by
    older versions hold the display name); `default` for anything else."""
    by_label = {label: method for method, label in CAM_LABELS.items()}
    if name in CAM_LABELS:
        return str(name)
    return by_label.get(str(name), default)


def compute_cam(model: nn.Module, layer: nn.Module, input_tensor: torch.Tensor,
                target_class: int, method: str = "gradcam") -> np.ndarray:
    """The class-activation map (HxW float32 in [0, 1]) of one CHW or 1xCxHxW input."""
    if method not in _CAM_CLASSES:
        raise ValueError(f"Unknown CAM method {method!r}; choose one of {', '.join(CAM_LABELS)}.")
    batch = input_tensor if input_tensor.dim() == 4 else input_tensor.unsqueeze(0)
    device = next(model.parameters()).device
    if method == "gradcam" and pools_into_linear(model, layer):
        return _gradcam_closed_form(model, batch.to(device), target_class)
    with _CAM_CLASSES[method](model=model, target_layers=[layer]) as cam:
        maps = cam(input_tensor=batch.to(device),
                   targets=[ClassifierOutputTarget(target_class)] * len(batch))
    return np.nan_to_num(maps[0].astype(np.float32))



def head_weights(model: DenseNetClassifier, target_class: int) -> np.ndarray:
    """The linear head's fp32 weights (K) of one class."""
    return model.classifier.weight[target_class].detach().float().cpu().numpy()


@torch.no_grad()
def _gradcam_closed_form(model: DenseNetClassifier, batch: torch.Tensor, target_class: int
                         ) -> np.ndarray:
    """`gradcam_from_activations` of the activations of one forward pass (no backward)."""
    activations = model.forward_with_activations(batch.float())[1].float()
    return gradcam_from_activations(activations[0].cpu().numpy(),
                                    head_weights(model, target_class),
                                    (batch.shape[-2], batch.shape[-1]))


def gradcam_from_activations(activations: np.ndarray, weights: np.ndarray,
                             size: tuple[int, int]) -> np.ndarray:
    """Grad-CAM (HxW in [0, 1] at `size` (H, W)) of activations A (K x h x w) that reach the
    class score only through global average pooling and a linear layer with the class's
    weights `weights` (K). The gradient of the score with respect to A_k(i, j) is then
    W_k / (h w) everywhere, so Grad-CAM's channel weights are W / (h w) and the map is
    ReLU(sum_k W_k A_k) up to that positive factor, which the min-max scaling removes. Scaled
    and resized exactly as pytorch-grad-cam does."""
    k, h, w = activations.shape
    raw = np.tensordot(weights.astype(np.float32) / (h * w), activations.astype(np.float32),
                       axes=1)[None]
    scaled = scale_cam_image(np.maximum(raw, 0), (size[1], size[0]))
    return np.nan_to_num(scale_cam_image(np.maximum(scaled, 0))[0].astype(np.float32))


def colorize(cam: np.ndarray) -> np.ndarray:
    """A heat map (HxW in [0, 1]) as an RGB uint8 image with the 'jet' colours."""
    heat = cv2.applyColorMap((np.clip(cam, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.cvtColor(heat, cv2.COLOR_BGR2RGB)


def colour_scale(width: int = 256, height: int = 14) -> np.ndarray:
    """The map's colours from low (left) to high (right) as an RGB uint8 strip."""
    return colorize(np.tile(np.linspace(0.0, 1.0, width, dtype=np.float32), (height, 1)))


def overlay(image: np.ndarray, cam: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """`image` (HxWx3 uint8) blended with the coloured map; `opacity` 0 shows the image only."""
    if not 0.0 <= opacity <= 1.0:
        raise ValueError("opacity must be between 0 and 1")
    if cam.shape != image.shape[:2]:
        cam = cv2.resize(cam, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    blend = (1 - opacity) * image.astype(np.float32) + opacity * colorize(cam).astype(np.float32)
    return np.clip(blend.round(), 0, 255).astype(np.uint8)
