"""Models, one per task, all usable under Opacus (no BatchNorm, GroupNorm with explicit groups)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


class LogisticRegression(nn.Module):
    """A linear classifier over flattened inputs."""

    def __init__(self, input_dim: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(input_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


class MLP(nn.Module):
    """A small multi-layer perceptron over flattened inputs."""

    def __init__(self, input_dim: int, num_classes: int, hidden: Sequence[int] = (64,)):
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class SmallCNN(nn.Module):
    """Two conv blocks with GroupNorm (never BatchNorm: per-example gradients must stay independent)."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 32, groups: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.GroupNorm(groups, width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GroupNorm(groups, 2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * width * side * side, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CharGRU(nn.Module):
    """Next-character model: embedding, GRU, linear head on the last step.

    Uses Opacus's DPGRU when asked (``dp_compatible=True``) so per-sample gradients exist.
    """

    def __init__(self, vocab_size: int, embed_dim: int = 8, hidden: int = 128, dp_compatible: bool = True):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        if dp_compatible:
            from opacus.layers import DPGRU

            self.rnn: nn.Module = DPGRU(embed_dim, hidden, batch_first=True)
        else:
            self.rnn = nn.GRU(embed_dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(x))
        return self.head(out[:, -1, :])


def default_model_for(task: str, input_shape: Sequence[int]) -> str:
    """The model a data set gets when ``model=auto``."""
    if task == "next_char":
        return "char_gru"
    if task == "tabular":
        return "logreg"
    if task == "text_classification":
        return "transformer"
    if len(input_shape) == 3 and input_shape[-1] >= 28:
        return "cnn"
    return "mlp"


def build_model(
    name: str,
    *,
    task: str,
    input_shape: Sequence[int],
    num_classes: int,
    vocab_size: int | None = None,
    hidden: Sequence[int] = (64,),
    width: int = 32,
    seed: int = 0,
) -> nn.Module:
    """Build a freshly initialised model, deterministic for ``seed``."""
    if name == "auto":
        name = default_model_for(task, input_shape)
    builder = MODELS.get(name)
    if builder is None:
        raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}")
    input_dim = 1
    for d in input_shape:
        input_dim *= int(d)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return builder(input_dim=input_dim, input_shape=tuple(input_shape), num_classes=num_classes,
                       vocab_size=vocab_size, hidden=hidden, width=width)
    finally:
        torch.random.set_rng_state(gen_state)


def _cnn(*, input_shape: tuple, num_classes: int, width: int, **_: Any) -> nn.Module:
    if len(input_shape) != 3:
        raise ValueError(f"model=cnn needs image inputs (C, H, W), got shape {tuple(input_shape)}")
    return SmallCNN(int(input_shape[0]), int(input_shape[1]), num_classes, width=width)


def _char_gru(*, vocab_size: int | None, hidden: Sequence[int], **_: Any) -> nn.Module:
    if vocab_size is None:
        raise ValueError("model=char_gru needs a data set with a vocabulary (shakespeare)")
    return CharGRU(vocab_size, hidden=int(hidden[0]) if hidden else 128)


# The registry: config model.name -> builder (keyword arguments as build_model passes them).
MODELS: dict[str, Callable[..., nn.Module]] = {
    "logreg": lambda *, input_dim, num_classes, **_: LogisticRegression(input_dim, num_classes),
    "mlp": lambda *, input_dim, num_classes, hidden, **_: MLP(input_dim, num_classes, hidden),
    "cnn": _cnn,
    "char_gru": _char_gru,
}
# auto: default_model_for(task, input_shape); transformer: fedpriv.language_model (built by fedpriv.task.new_model)
MODEL_NAMES = ("auto", *MODELS, "transformer")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
