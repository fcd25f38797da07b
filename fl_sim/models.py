"""Model registry: the DLG LeNet, a ReLU LeNet, a small ConvNet, torchvision ResNet-18/50."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fl_sim.base.errors import DataUnavailableError
from fl_sim.base.registry import Registry
from fl_sim.base.streams import MODEL_INIT

if TYPE_CHECKING:
    from fl_sim.scenario import ModelConfig

Shape = tuple[int, int, int]  # (C, H, W)


@dataclass(frozen=True)
class ModelSpec:
    """``build(num_classes, shape, stem)`` → a freshly initialised nn.Module."""

    build: Callable[[int, Shape, str], nn.Module]
    description: str
    imagenet_weights: str | None = None  # torchvision weights enum member, e.g. "ResNet18_Weights.IMAGENET1K_V1"


MODELS: Registry[ModelSpec] = Registry("model")


class LeNet(nn.Module):
    """LeNet as DLG / iDLG use it: three 5×5 convolutions with 12 channels, one linear layer.

    Input (B, C, H, W) → logits (B, num_classes). ``act`` is Sigmoid in the papers (twice
    differentiable everywhere, which gradient matching relies on).
    """

    def __init__(self, num_classes: int, shape: Shape, act: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        c, h, w = shape
        self.body = nn.Sequential(
            nn.Conv2d(c, 12, kernel_size=5, padding=2, stride=2), act(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2), act(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1), act(),
        )
        with torch.no_grad():
            features = self.body(torch.zeros(1, c, h, w)).numel()
        self.fc = nn.Sequential(nn.Linear(features, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def dlg_init(model: nn.Module) -> nn.Module:
    """DLG's initialisation: every weight and bias ~ U(-0.5, 0.5)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.uniform_(m.weight, -0.5, 0.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    return model


class ConvNet(nn.Module):
    """Small ConvNet: 3 × (conv 3×3 → BatchNorm → ReLU → max-pool 2), global average pool, linear."""

    def __init__(self, num_classes: int, shape: Shape, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = shape[0]
        for out in (width, 2 * width, 4 * width):
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            c = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def _resnet(arch: str) -> Callable[[int, Shape, str], nn.Module]:
    def build(num_classes: int, shape: Shape, stem: str) -> nn.Module:
        import torchvision.models as tvm

        model = getattr(tvm, arch)(weights=None, num_classes=num_classes)
        if shape[0] != 3 or stem == "cifar":
            kernel, stride, pad = (3, 1, 1) if stem == "cifar" else (7, 2, 3)
            model.conv1 = nn.Conv2d(shape[0], 64, kernel, stride, pad, bias=False)
        if stem == "cifar":  # CIFAR stem: 3×3 stride-1 convolution, no max-pool (He et al. §4.2)
            model.maxpool = nn.Identity()
        return model

    return build


MODELS.add("lenet", ModelSpec(lambda k, s, _: dlg_init(LeNet(k, s)),
                              "LeNet exactly as DLG/iDLG: sigmoid, 12-channel 5×5 convs, U(-0.5, 0.5) init"))
MODELS.add("lenet-relu", ModelSpec(lambda k, s, _: LeNet(k, s, act=nn.ReLU), "LeNet with ReLU, PyTorch init"))
MODELS.add("convnet", ModelSpec(lambda k, s, _: ConvNet(k, s), "small ConvNet (3 conv-BN-ReLU-pool blocks)"))
MODELS.add("resnet18", ModelSpec(_resnet("resnet18"), "torchvision ResNet-18", "ResNet18_Weights.IMAGENET1K_V1"))
MODELS.add("resnet50", ModelSpec(_resnet("resnet50"), "torchvision ResNet-50", "ResNet50_Weights.IMAGENET1K_V2"))


@functools.cache
def structure(name: str) -> nn.Module:
    """An untrained instance of model ``name`` (10 classes, 3×32×32 input) for questions about its structure
    (does it have a last residual block?), never for training."""
    return MODELS.get(name).build(10, (3, 32, 32), "cifar")


def resolve_stem(cfg: ModelConfig, shape: Shape) -> str:
    """'cifar' for inputs ≤ 64 px unless the scenario says otherwise."""
    return cfg.stem if cfg.stem != "auto" else ("cifar" if max(shape[1:]) <= 64 else "imagenet")


def build_model(cfg: ModelConfig, num_classes: int, shape: Shape, seed: int) -> nn.Module:
    """The global model at round 0: seeded init, then ImageNet or file weights if asked."""
    spec = MODELS.get(cfg.name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(MODEL_INIT.seed(seed))  # = seed: the models fl-sim always built
        model = spec.build(num_classes, shape, resolve_stem(cfg, shape))
    if cfg.pretrained:
        _load_matching(model, imagenet_state_dict(cfg.name, spec))
    if cfg.weights:
        _load_matching(model, load_state_dict_file(Path(os.path.expanduser(cfg.weights))))
    return model


def imagenet_checkpoint(name: str, spec: ModelSpec) -> Path:
    """Where torchvision keeps this model's ImageNet checkpoint (TORCH_HOME/hub/checkpoints)."""
    if spec.imagenet_weights is None:
        raise DataUnavailableError(f"model '{name}' has no ImageNet weights; set model.pretrained = false")
    weights = _weights_enum(spec.imagenet_weights)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


def imagenet_state_dict(name: str, spec: ModelSpec) -> dict[str, torch.Tensor]:
    path = imagenet_checkpoint(name, spec)
    if not path.exists():
        raise DataUnavailableError(
            f"ImageNet weights for '{name}' are not on disk: expected {path}; copy the torchvision checkpoint there "
            f"(or point TORCH_HOME at a folder with hub/checkpoints/{path.name}), or set model.pretrained = false")
    return torch.load(path, map_location="cpu", weights_only=True)


def _weights_enum(qualified: str):  # type: ignore[no-untyped-def]
    import torchvision.models as tvm

    enum_name, member = qualified.split(".")
    return getattr(getattr(tvm, enum_name), member)


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a PyTorch file (safe loading only)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _load_matching(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load entries whose name and shape match (classifier heads of another size are skipped)."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))
