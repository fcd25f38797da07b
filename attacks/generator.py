"""TLDR's conditioned generator with vector-matrix conditioning (§3.2.4).

    latent (B, L) ‖ vector (B, K) ──ConvT(k = K)──► (B, 2w, K, K) ‖ hot matrix (B, 1, K, K)
        ──ConvT / Conv to (⌈H/2⌉, ⌈W/2⌉)──► ──ConvT stride 2──► (B, w/2, H, W) ──Conv 3×3──► images (B, C, H, W)

Each stage is transposed convolution → batch norm → leaky ReLU → dropout (heavy dropout keeps the
samples diverse). The vector conditions the generator from the start; the K×K hot conditioning
matrix (row and column of the label set to one) is concatenated once the features are K×K. The
output is not squashed: the pixel-range loss keeps it in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Shape = tuple[int, int, int]


def hot_matrix(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B,) labels → (B, 1, K, K): row and column ``label`` are one, every other entry zero."""
    hot = F.one_hot(labels, num_classes).float()
    return torch.maximum(hot[:, :, None], hot[:, None, :])[:, None]


def balanced_labels(batch: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """(B,) labels covering the classes evenly, shuffled."""
    labels = (torch.arange(batch) + int(torch.randint(num_classes, (1,), generator=gen))) % num_classes
    return labels[torch.randperm(batch, generator=gen)]


def soft_vectors(labels: torch.Tensor, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """Inversion's conditioning (B, K): soft-maxed N(0, 1) vectors whose argmax is ``labels`` (the largest
    draw is swapped into the label's place, which is a draw conditioned on its argmax)."""
    draws = torch.randn(len(labels), num_classes, generator=gen)
    rows = torch.arange(len(labels))
    top = draws.argmax(-1)
    draws[rows, top], draws[rows, labels] = draws[rows, labels], draws[rows, top].clone()
    return F.softmax(draws, dim=-1)


def hot_vectors(labels: torch.Tensor, num_classes: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """Reconstruction's conditioning (B, K): one-hot vectors of ``labels``."""
    return F.one_hot(labels, num_classes).float()


def _stage(conv: nn.Module, out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(out), nn.LeakyReLU(0.2), nn.Dropout(dropout))


def _resize(c_in: int, c_out: int, size: int, target: tuple[int, int]) -> nn.Module:
    """K×K → target (h, w): a transposed convolution that grows, or a convolution that shrinks, per axis."""
    grow = [t >= size for t in target]
    if all(grow):
        return nn.ConvTranspose2d(c_in, c_out, kernel_size=tuple(t - size + 1 for t in target))
    if not any(grow):
        return nn.Conv2d(c_in, c_out, kernel_size=tuple(size - t + 1 for t in target))
    return nn.Sequential(nn.Upsample(size=target), nn.Conv2d(c_in, c_out, 3, padding=1))


class ConditionedGenerator(nn.Module):
    """(latent (B, L), vector (B, K), labels (B,)) → images (B, C, H, W)."""

    def __init__(self, latent_dim: int, num_classes: int, shape: Shape, width: int = 64, dropout: float = 0.5) -> None:
        super().__init__()
        c, h, w = shape
        k, half = num_classes, ((h + 1) // 2, (w + 1) // 2)
        self.num_classes = num_classes
        self.stem = _stage(nn.ConvTranspose2d(latent_dim + k, 2 * width, kernel_size=k), 2 * width, dropout)
        self.middle = _stage(_resize(2 * width + 1, width, k, half), width, dropout)
        # stride 2, padding 1: kernel 4 doubles an even side, kernel 3 gives 2·side − 1 for an odd one
        kernel = tuple(4 if s % 2 == 0 else 3 for s in (h, w))
        self.up = _stage(nn.ConvTranspose2d(width, width // 2, kernel_size=kernel, stride=2, padding=1),
                         width // 2, dropout)
        self.out = nn.Conv2d(width // 2, c, kernel_size=3, padding=1)

    def forward(self, latent: torch.Tensor, vector: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.stem(torch.cat([latent, vector], dim=1)[:, :, None, None])
        x = torch.cat([x, hot_matrix(labels, self.num_classes).to(x.dtype)], dim=1)
        return self.out(self.up(self.middle(x)))
