"""`Prior`: the interface every prior p(z) implements (built-in or from a plugin)."""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import torch
from torch import distributions as D
from torch import nn


class Prior(nn.Module):
    """A prior p(z) over a `dim`-dimensional latent space.

    Capability flags say what a prior can do, in the style of torch.distributions:
    - `has_log_prob`: `log_prob(z)` exists (sample-only priors set it to False, and every
      term or estimator that needs a density refuses them when the objective is built);
    - `has_rsample`: `rsample(n)` draws samples differentiable in the prior's parameters;
    - `needs_samples`: the prior is fitted to prior samples given as `samples=` (e.g. `gmm`).

    Subclasses implement `sample` and either `distribution()` (preferred: analytic KL then
    goes through `torch.distributions.kl_divergence`) or `log_prob`. They are `nn.Module`s so
    that their tensors move with `.to(device)`, are saved in checkpoints and can be learned.
    `spec()` returns the JSON-able constructor arguments that rebuild an empty prior of the same
    shapes, into which a saved `state_dict` is then loaded.
    """

    name: ClassVar[str] = ""
    has_log_prob: ClassVar[bool] = True
    has_rsample: ClassVar[bool] = False
    needs_samples: ClassVar[bool] = False

    def __init__(self, dim: int):
        super().__init__()
        if int(dim) <= 0:
            from .errors import ElbokitError

            raise ElbokitError(f"The prior's dimension must be a positive integer, got {dim}.")
        self.dim = int(dim)
        # Tracks the device and dtype the prior lives on; not saved.
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def distribution(self) -> D.Distribution | None:
        """The prior as a torch Distribution with event shape (dim,), or None if there is none."""
        return None

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) for z of shape (B, dim); returns (B,)."""
        dist = self.distribution()
        if dist is None or not self.has_log_prob:
            raise NotImplementedError(f"Prior '{self.name}' has no log_prob.")
        return dist.log_prob(z)

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype the prior computes in (follows `.to(dtype)`)."""
        return self._anchor.dtype

    @abstractmethod
    def sample(self, n: int) -> torch.Tensor:
        """n samples, shape (n, dim), on the prior's device."""

    def rsample(self, n: int) -> torch.Tensor:
        """n reparameterised samples, shape (n, dim), differentiable in the prior's parameters.
        Priors that declare `has_rsample = True` provide it: the default uses
        `distribution().rsample`; a prior without `distribution()` overrides it."""
        dist = self.distribution()
        if dist is None or not dist.has_rsample:
            raise NotImplementedError(f"Prior '{self.name}' has no rsample.")
        return dist.rsample((n,))

    @property
    def distinct_samples(self) -> int | None:
        """How many distinct points `reference_sample` can return: None (the default) for a
        continuous prior, the bank size for a prior that draws from a finite bank."""
        return None

    def reference_sample(self, n: int) -> torch.Tensor:
        """Up to n samples, all distinct points, as the reference set of a sample-based
        estimator (the k-NN cross-entropy): `sample(n)` by default. A prior that draws from a
        finite bank returns n distinct bank rows, or the whole bank when it holds fewer; the
        estimator then uses the number of rows it got (duplicates would sit at distance zero
        and bias a k-NN estimate low)."""
        return self.sample(n)

    def attach(self, model: Any) -> None:
        """Called once with the model before training; priors that depend on the encoder
        (such as a VampPrior) keep a reference here. The default does nothing."""

    def spec(self) -> dict[str, Any]:
        """JSON-able keyword arguments that rebuild this prior's shapes (see the class docstring)."""
        return {"dim": self.dim}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}"
