"""`Model`: what elbokit trains, an encoder q(z|x) and a decoder, built from the data's shape.

A model class is registered through the `register_models` hook and built as
`ModelClass(event_shape, latent_dim, **options)`, where `event_shape` is the shape of one
example (`(D,)` for vectors, `(C, H, W)` for images) and the options are the keyword
arguments of its `__init__` (their defaults are what `--model-option` may change).

Shapes: `encode(x)` takes x of shape (B, *event_shape) and returns q(z|x) with batch shape
(B,) and event shape (L,); `decode(z)` takes (B, L) and returns the likelihood's parameters
of shape (B, *event_shape). `forward` (written once here) encodes, samples and decodes one
minibatch into the `Batch` the objective reads.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import distributions as D
from torch import nn
from torch.nn import functional as F

from elbokit.batch import Batch, gaussian_posterior


def as_event_shape(event_shape: int | Sequence[int]) -> tuple[int, ...]:
    """`5` -> (5,); `(1, 8, 8)` -> (1, 8, 8); every size a positive integer."""
    shape = (int(event_shape),) if isinstance(event_shape, (int,)) else tuple(int(s) for s in event_shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"an event shape must be a non-empty tuple of positive sizes, got {event_shape!r}")
    return shape


class Model(nn.Module):
    """An encoder to a diagonal Gaussian q(z|x) and a decoder to the likelihood's parameters."""

    name = ""
    event_ndims: tuple[int, ...] | None = None
    """The numbers of event dimensions the model takes (None: any), e.g. (3,) for (C, H, W)."""

    def __init__(self, event_shape: int | Sequence[int], latent_dim: int):
        super().__init__()
        self.event_shape = as_event_shape(event_shape)
        self.latent_dim = int(latent_dim)

    @property
    def data_dim(self) -> int:
        """The number of values in one example, prod(event_shape)."""
        return math.prod(self.event_shape)

    @classmethod
    def unsupported(cls, event_shape: tuple[int, ...]) -> str | None:
        """Why this model cannot take examples of `event_shape` (None when it can)."""
        if cls.event_ndims is not None and len(event_shape) not in cls.event_ndims:
            wanted = " or ".join(f"{n}-D" for n in cls.event_ndims)
            return f"model '{cls.name}' takes {wanted} examples, but the data's examples have shape {tuple(event_shape)}"
        return None

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """{option: default} of the keyword arguments after (event_shape, latent_dim)."""
        params = list(inspect.signature(cls.__init__).parameters.values())[3:]
        return {p.name: p.default for p in params
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is not p.empty}

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> None:
        """Raise ValueError for an option the model does not take or a bad value (called when a
        config is resolved, before any data is loaded); subclasses check their values."""
        defaults = cls.option_defaults()
        for key in options:
            if key not in defaults:
                raise ValueError(f"model '{cls.name}' has no option '{key}' (its options: {', '.join(defaults) or 'none'})")

    def encode(self, x: torch.Tensor):
        """q(z|x), a torch Distribution with batch shape (B,) and event shape (L,)."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's parameters, (B, *event_shape)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, x_pos: torch.Tensor | None = None,
                dataset_size: int | None = None) -> Batch:
        """Encode, sample and decode one minibatch (and its positives when given).

        With positives, x and x+ go through the encoder as one batch of 2B rows when
        `joint_positive_pass` allows (see there); z is drawn before z+, as with two passes, so
        the random draws are the same."""
        if x_pos is None:
            posterior = self.encode(x)
            z = posterior.rsample()
            return Batch(x=x, posterior=posterior, z=z, x_recon=self.decode(z), dataset_size=dataset_size)
        posterior, posterior_pos = self.encode_pair(x, x_pos)
        z = posterior.rsample()
        batch = Batch(x=x, posterior=posterior, z=z, x_recon=self.decode(z), dataset_size=dataset_size)
        batch.x_pos = x_pos
        batch.posterior_pos = posterior_pos
        batch.z_pos = posterior_pos.rsample()
        return batch

    joint_positive_pass = True
    """Whether `encode_pair` may encode x and x+ in one pass. One pass of 2B rows does the work
    of two passes of B in fewer, larger operations (at one thread it measured the same as two
    passes, docs/benchmarks.md; two threads were not measured apart); the result is the same
    up to float rounding for an encoder that treats each example on its own. Set it to False for an encoder whose output for one example depends on the others
    in its batch; batch normalisation is detected and always gets two passes."""

    def encode_pair(self, x: torch.Tensor, x_pos: torch.Tensor):
        """(q(z|x), q(z|x+)): one encoder pass over the concatenated batch when the model
        allows it (`joint_positive_pass`) and the posterior is a diagonal Gaussian (which can
        be split by rows), else two passes."""
        if (not self.joint_positive_pass or x.shape[1:] != x_pos.shape[1:] or x.dtype != x_pos.dtype
                or any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.modules())):
            return self.encode(x), self.encode(x_pos)
        both = self.encode(torch.cat([x, x_pos]))
        base = both.base_dist if isinstance(both, D.Independent) else None
        if not (isinstance(base, D.Normal) and both.reinterpreted_batch_ndims == 1 and base.loc.dim() == 2):
            # A posterior elbokit cannot split by rows: encode the two halves apart from now on.
            self.joint_positive_pass = False
            return self.encode(x), self.encode(x_pos)
        n = x.shape[0]
        # The whole was validated (when torch validates distribution arguments) as it was built.
        return tuple(D.Independent(D.Normal(base.loc[rows], base.scale[rows], validate_args=False), 1,
                                   validate_args=False)
                     for rows in (slice(0, n), slice(n, None)))


def posterior_from(params: torch.Tensor):
    """q(z|x) from an encoder's (B, 2L) output: loc and softplus(pre-scale) + 1e-4."""
    loc, pre_scale = params.chunk(2, dim=-1)
    # softplus keeps scales positive without the exp overflow of a raw log-variance.
    return gaussian_posterior(loc, F.softplus(pre_scale) + 1e-4)
