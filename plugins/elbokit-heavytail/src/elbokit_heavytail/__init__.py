"""elbokit-heavytail: heavy-tailed priors p(z) with independent Student-t or Cauchy coordinates.

Installed, it registers the priors `student-t` and `cauchy` through the `elbokit` entry-point
group:

    pip install ./plugins/elbokit-heavytail
    elbokit priors                                              # lists student-t and cauchy
    elbokit train --prior student-t --prior-option df=3 ...

Both are `Independent` wrappers of a torch base distribution for which torch registers no KL
from a Normal, so the KL to them is estimated by Monte Carlo (`kl.estimator=auto` or `mc`), and
`kl.estimator=analytic` is refused when the objective is built. It imports only elbokit's
public API and torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import distributions as D

from elbokit import ElbokitError, Prior, hookimpl

__version__ = "0.1.0"


def _positive(name: str, prior: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ElbokitError(f"The '{prior}' prior's {name} must be a number > 0, got {value!r}.") from None
    if not number > 0 or number == float("inf"):
        raise ElbokitError(f"The '{prior}' prior's {name} must be a finite number > 0, got {value!r}.")
    return number


class StudentTPrior(Prior):
    """Independent Student-t coordinates, t_df(0, scale): heavy tails, Monte-Carlo KL.

    p(z) = prod_l StudentT(z_l; df, 0, scale), held as
    `Independent(StudentT(df, 0, scale), 1)`. Options: `df` (degrees of freedom, default 3;
    the variance is finite for df > 2) and `scale` (default 1).
    """

    name = "student-t"
    has_rsample = True

    def __init__(self, dim: int, df: float = 3.0, scale: float = 1.0):
        super().__init__(dim)
        self.df = _positive("df", self.name, df)
        self.scale = _positive("scale", self.name, scale)

    def distribution(self) -> D.Distribution:
        zeros = torch.zeros(self.dim, device=self.device, dtype=self.dtype)
        return D.Independent(D.StudentT(zeros + self.df, zeros, zeros + self.scale), 1)

    def sample(self, n: int) -> torch.Tensor:
        return self.distribution().sample((n,))

    def spec(self) -> dict[str, Any]:
        return {"dim": self.dim, "df": self.df, "scale": self.scale}


class CauchyPrior(Prior):
    """Independent Cauchy coordinates, Cauchy(0, scale): no mean, Monte-Carlo KL.

    p(z) = prod_l Cauchy(z_l; 0, scale), held as `Independent(Cauchy(0, scale), 1)`: the
    Student-t with df = 1. Option: `scale` (default 1).
    """

    name = "cauchy"
    has_rsample = True

    def __init__(self, dim: int, scale: float = 1.0):
        super().__init__(dim)
        self.scale = _positive("scale", self.name, scale)

    def distribution(self) -> D.Distribution:
        zeros = torch.zeros(self.dim, device=self.device, dtype=self.dtype)
        return D.Independent(D.Cauchy(zeros, zeros + self.scale), 1)

    def sample(self, n: int) -> torch.Tensor:
        return self.distribution().sample((n,))

    def spec(self) -> dict[str, Any]:
        return {"dim": self.dim, "scale": self.scale}


@hookimpl
def register_priors(register):
    register(StudentTPrior)
    register(CauchyPrior)
