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
