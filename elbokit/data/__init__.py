"""Datasets: the `Dataset` container shared by training, evaluation and plugins."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Dataset:
    """Data as arrays, before splitting. x (N, D); optional positives x_pos (N, D) and true
    latents z (N, L); `meta` holds generator parameters (e.g. W, noise_std) as arrays or
    numbers; `image_shape` is set for image data (e.g. (8, 8))."""

    name: str
    x: np.ndarray
    x_pos: np.ndarray | None = None
    z: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    image_shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])


@dataclass
class Standardizer:
    """Per-feature standardisation fitted on the training split: x_model = (x - mean) / std.

    A log-density in model space converts to original data units by adding
    `log_abs_det_jacobian` = -sum(log std) (DESIGN.md section 1)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, eps: float = 1e-8) -> "Standardizer":
        std = x.std(axis=0)
        return cls(mean=x.mean(axis=0), std=np.where(std > eps, std, 1.0))

    @classmethod
    def identity(cls, dim: int) -> "Standardizer":
        return cls(mean=np.zeros(dim), std=np.ones(dim))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return x * self.std + self.mean

    @property
    def log_abs_det_jacobian(self) -> float:
        """Add this to a log-density of standardised x to get one in original units."""
        return float(-np.log(self.std).sum())
