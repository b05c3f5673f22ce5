"""Backbones, their initialisation, and checkpoints: a model folder's safetensors weights with
its model card (`card`).

Loading a checkpoint never executes code: weights are safetensors and the card is JSON.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision import models as tvm

from bus_core import atomic
from bus_core.constants import CLASSES
from bus_core.errors import ModelError
from bus_core.models.card import (
    ARCHS,
    WEIGHTS_FILE,
    ModelCard,
    read_card,
    resolve_model_dir,
    write_card,
)
from bus_core.models.unet import SEG_ARCH, DenseNetUNet, pooled

log = logging.getLogger(__name__)

MIN_INPUT_SIZE: dict[str, int] = {"densenet121": 32, "vgg16": 32, "resnet50": 32,
                                  "inception_v3": 75}
"""The smallest input side (px) each architecture can take: below it a layer's feature map
would shrink to nothing."""


class DenseNetClassifier(nn.Module):
    """torchvision's DenseNet121 with a non-in-place final ReLU.

    torchvision applies `F.relu(..., inplace=True)` to the output of `features.norm5`, so hooks
    there see different tensors on CPU and GPU. Here the ReLU is a module of its own
    (`final_relu`), the Grad-CAM target, and the state dict keys stay torchvision's.
    """

    def __init__(self, base: tvm.DenseNet) -> None:
        super().__init__()
        self.features = base.features
        self.final_relu = nn.ReLU(inplace=False)
        self.classifier = base.classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_activations(x)[0]

    def forward_with_activations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, the `final_relu` activations, the Grad-CAM layer's) from one pass. They
        reach the logits only through global average pooling and the linear classifier."""
        activations = self.final_relu(self.features(x))
        return self.classifier(pooled(activations)), activations


def _imagenet_weights(arch: str) -> Any:
    return tvm.get_model_weights(arch).DEFAULT


def imagenet_cached(arch: str) -> bool:
    """True when torchvision's ImageNet weights for `arch` are in the torch hub cache (so
    'imagenet' initialisation works offline)."""
    url = _imagenet_weights(arch).url
    return (Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]).is_file()


def _torchvision_model(arch: str, pretrained: bool) -> nn.Module:
    weights = _imagenet_weights(arch) if pretrained else None
    try:
        if arch == "inception_v3":
            model = tvm.inception_v3(weights=weights, aux_logits=pretrained, transform_input=True,
                                     init_weights=not pretrained)
            model.aux_logits, model.AuxLogits = False, None
            return model
        return tvm.get_model(arch, weights=weights)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise ModelError(
            f"ImageNet weights for {arch} could not be loaded ({exc.__class__.__name__}: {exc}). "
            f"They are downloaded by torchvision on first use, which needs internet access or a "
            f"copy in the torch hub cache ({cache}). Use init 'random' or a local checkpoint."
        ) from exc


def _linear(model: nn.Module, name: str) -> nn.Linear:
    layer = model.get_submodule(name)
    assert isinstance(layer, nn.Linear), f"{name} of this network is not a linear layer"
    return layer


def _replace_head(model: nn.Module, arch: str, num_classes: int) -> nn.Module:
    name = {"densenet121": "classifier", "vgg16": "classifier.6"}.get(arch, "fc")
    parent, _, attribute = name.rpartition(".")
    head = nn.Linear(_linear(model, name).in_features, num_classes)
    setattr(model.get_submodule(parent) if parent else model, attribute, head)
    return DenseNetClassifier(model) if arch == "densenet121" else model


def build_model(arch: str = "densenet121", num_classes: int = len(CLASSES),
                init: str | Path = "random") -> nn.Module:
    """A classifier of `arch` with `num_classes` outputs.

    `init` is 'random', 'imagenet' (torchvision's weights API; needs internet or a hub cache),
    or the path of a checkpoint of the same architecture (its head is kept when shapes match).
    """
    if arch not in ARCHS:
        raise ModelError(f"Unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}.")
    init_str = str(init)
    model = _replace_head(_torchvision_model(arch, pretrained=init_str == "imagenet"), arch,
                          num_classes)
    if init_str not in ("random", "imagenet"):
        source = load_model(init_str)
        if source.card.arch != arch:
            raise ModelError(f"The checkpoint {init_str} is a {source.card.arch}, not a {arch}.")
        own = model.state_dict()
        compatible = {k: v for k, v in source.model.state_dict().items()
                      if k in own and own[k].shape == v.shape}
        model.load_state_dict(compatible, strict=False)
    return model


def pools_into_linear(model: nn.Module, layer: nn.Module | None = None
                      ) -> TypeGuard[DenseNetClassifier]:
    """True for a `DenseNetClassifier` (with `layer`: when it is its `final_relu`):
    that layer feeds only global average pooling and a linear classifier, so its Grad-CAM has
    a closed form (`gradcam_from_activations`)."""
    return isinstance(model, DenseNetClassifier) and (layer is None or layer is model.final_relu)


def gradcam_layer(model: nn.Module, arch: str) -> nn.Module:
    """The layer whose activations Grad-CAM explains (never modified in place afterwards)."""
    layers = {"densenet121": "final_relu", "vgg16": "features.29", "resnet50": "layer4.2",
              "inception_v3": "Mixed_7c"}
    if arch not in layers:
        raise ModelError(f"No Grad-CAM layer known for {arch!r}.")
    return model.get_submodule(layers[arch])


@dataclass
class LoadedModel:
    """A model in eval mode with its card and the folder it came from."""

    model: nn.Module
    card: ModelCard
    path: Path

    @property
    def weights_id(self) -> str:
        """The weights' sha256: the card's, else that of the weights file, else (a model not
        saved yet) of the parameters and buffers in memory."""
        if self.card.weights_sha256:
            return self.card.weights_sha256
        weights = self.path / WEIGHTS_FILE
        if weights.is_file():
            return file_sha256(weights)
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                          .numpy().tobytes())  # any dtype, bf16 included
        return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model(model: nn.Module, card: ModelCard, out_dir: str | Path,
               dtype: torch.dtype = torch.float32) -> Path:
    """Write `out_dir/model.safetensors` (in `dtype`) and `out_dir/card.json`; returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu())
             .contiguous() for k, v in model.state_dict().items()}
    weights = out / WEIGHTS_FILE
    with atomic.atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"arch": card.arch, "classes": ",".join(card.classes)})
    card.weights_sha256 = file_sha256(weights)
    card.weights_dtype = str(dtype).removeprefix("torch.")
    write_card(card, out)
    return out


def _network_for(card: ModelCard) -> nn.Module:
    """An untrained network of the card's task and architecture."""
    if card.task == "segmentation":
        if card.arch != SEG_ARCH:
            raise ModelError(f"A segmentation model must be a {SEG_ARCH}, not {card.arch!r}.")
        return DenseNetUNet(num_classes=0)
    if card.task != "classification":
        raise ModelError(f"The model card names an unknown task {card.task!r}.")
    if card.arch not in ARCHS:
        raise ModelError(f"The model card names an unknown architecture {card.arch!r}.")
    return _replace_head(_torchvision_model(card.arch, pretrained=False), card.arch,
                         len(card.classes))


def load_model(path: str | Path, *, verify_hash: bool = True,
               label: str | None = None) -> LoadedModel:
    """Load a model folder (weights + card) in eval mode on the CPU, in fp32.

    Refuses a card whose architecture, classes or weights hash do not match the weights.
    Messages name the model by its folder, or by `label` (e.g. "the uploaded model").
    """
    folder = resolve_model_dir(path)
    card = read_card(folder, label=label)
    where = label or str(folder)
    weights = folder / WEIGHTS_FILE
    if verify_hash and card.weights_sha256 and file_sha256(weights) != card.weights_sha256:
        raise ModelError(f"The weights of {where} do not match its model card (sha256 differs): "
                         "the files were changed or mixed up. Re-export the model.")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError, ValueError) as exc:
        log.info("Unreadable safetensors %s: %s", weights, exc)
        raise ModelError(f"The weights file of {where} is damaged or not a safetensors "
                         "file. Re-export the model.") from exc
    model = _network_for(card)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        log.info("Weights of %s vs a %s with %d outputs: %d missing, %d unexpected, "
                 "%d wrong-shaped tensors, e.g. %s", folder, card.arch, len(card.classes),
                 len(missing), len(unexpected), len(wrong), (missing or unexpected or wrong)[:3])
        raise ModelError(f"The weights of {where} are not those of the network its card "
                         f"describes (a {card.arch} with {len(card.classes)} classes): the card "
                         "belongs to another model. Export the model again, with its own card.")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    model.eval()
    return LoadedModel(model, card, folder)
