"""elbokit-vampprior: the VampPrior (Tomczak & Welling, 2018) as an elbokit prior plugin.

Installed, it registers the prior `vamp` through the `elbokit` entry-point group:

    pip install ./plugins/elbokit-vampprior
    elbokit priors                      # lists `vamp`
    elbokit train --prior vamp ...      # the pseudo-inputs are learned with the VAE

It imports only elbokit's public API and torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import distributions as D
from torch import nn

from elbokit import ElbokitError, Prior, hookimpl

__version__ = "0.1.0"


# [docs: prior class]
class VampPrior(Prior):
    """VampPrior: a mixture of the encoder's posteriors at K learned pseudo-inputs.

    p(z) = (1/K) sum_k q(z | u_k), where q(z|x) is the model's encoder and the pseudo-inputs
    u_k (a parameter of shape (K, data_dim)) are learned jointly with the VAE (Tomczak &
    Welling, "VAE with a VampPrior", AISTATS 2018). `distribution()` is a torch
    `MixtureSameFamily` of the encoder's diagonal Gaussians, so `log_prob` is differentiable
    in z, in the pseudo-inputs and in the encoder; there is no closed-form KL to a Gaussian
    posterior, so `kl` with the `auto` estimator uses Monte Carlo.

    Options: `n_components` K (default 50); `data_dim` (taken from the model when it is
    attached; `spec()` records it so that a checkpoint can be rebuilt); `init_std`, the
    standard deviation of the N(0, init_std^2) initial pseudo-inputs (1.0 suits elbokit's
    standardised features).
    """

    name = "vamp"
    has_log_prob = True
    has_rsample = False  # sampling picks a component: not reparameterisable
    needs_samples = False

    def __init__(self, dim: int, n_components: int = 50, data_dim: int | None = None,
                 init_std: float = 1.0):
        super().__init__(dim)
        if int(n_components) < 1:
            raise ElbokitError(f"The 'vamp' prior needs n_components >= 1, got {n_components}.")
        if not float(init_std) > 0:
            raise ElbokitError(f"The 'vamp' prior needs init_std > 0, got {init_std}.")
        self.n_components = int(n_components)
        self.init_std = float(init_std)
        self.data_dim = None if data_dim is None else int(data_dim)
        self.register_parameter("pseudo_inputs", None)  # created once data_dim is known
        if self.data_dim is not None:
            self._create_pseudo_inputs(self.data_dim)
        # The model is held outside nn.Module's registry: its parameters belong to the model,
        # not to the prior's state_dict or parameters() (an optimiser would see them twice).
        object.__setattr__(self, "_model", None)

    def _create_pseudo_inputs(self, data_dim: int) -> None:
        if data_dim < 1:
            raise ElbokitError(f"The 'vamp' prior needs data_dim >= 1, got {data_dim}.")
        self.data_dim = data_dim
        init = torch.randn(self.n_components, data_dim, dtype=self.dtype,
                           device=self.device) * self.init_std
        self.pseudo_inputs = nn.Parameter(init)

    def attach(self, model: Any) -> None:
        """Keep the model whose `encode(x)` defines the mixture; create the pseudo-inputs."""
        if not callable(getattr(model, "encode", None)):
            raise ElbokitError("The 'vamp' prior needs a model with an encode(x) method.")
        latent_dim = getattr(model, "latent_dim", self.dim)
        if int(latent_dim) != self.dim:
            raise ElbokitError(f"The 'vamp' prior has dimension {self.dim} but the model's "
                               f"latent dimension is {latent_dim}.")
        data_dim = getattr(model, "data_dim", None)
        if self.pseudo_inputs is None:
            if data_dim is None:
                raise ElbokitError("The 'vamp' prior needs the data dimension: give data_dim= "
                                   "or attach a model with a data_dim attribute.")
            self._create_pseudo_inputs(int(data_dim))
        elif data_dim is not None and int(data_dim) != self.data_dim:
            raise ElbokitError(f"The 'vamp' prior's pseudo-inputs have dimension {self.data_dim} "
                               f"but the model's data dimension is {data_dim}.")
        object.__setattr__(self, "_model", model)

    def distribution(self) -> D.Distribution:
        """(1/K) sum_k q(z|u_k) as MixtureSameFamily(Categorical, Independent(Normal))."""
        if self._model is None or self.pseudo_inputs is None:
            raise ElbokitError("The 'vamp' prior is a mixture of the encoder's posteriors: "
                               "call prior.attach(model) before using it (elbokit train does this).")
        components = self._model.encode(self.pseudo_inputs)  # batch (K,), event (dim,)
        uniform = torch.zeros(self.n_components, dtype=self.pseudo_inputs.dtype,
                              device=self.pseudo_inputs.device)
        return D.MixtureSameFamily(D.Categorical(logits=uniform), components)

    def sample(self, n: int) -> torch.Tensor:
        with torch.no_grad():
            return self.distribution().sample((n,))

    def spec(self) -> dict[str, Any]:
        return {"dim": self.dim, "n_components": self.n_components, "data_dim": self.data_dim}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, n_components={self.n_components}, data_dim={self.data_dim}"
# [/docs: prior class]


# [docs: hook]
@hookimpl
def register_priors(register):
    register(VampPrior)
# [/docs: hook]
