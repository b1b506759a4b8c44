"""Every hook in elbokit/hookspecs.py is documented in docs/plugin_hooks.md, has a test here
named `test_hook_<name>`, and its documented example runs. A new hook fails these tests until
it has all three."""

from __future__ import annotations

import inspect
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import elbokit
from elbokit import hookimpl, hookspecs
from elbokit.plugins import HOOKS, Registry
from elbokit.testing import check_estimator, check_prior, check_term

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugin_hooks.md"
HEADING = re.compile(r"^## (register_\w+)\((.*)\)\s*$", re.MULTILINE)


def hookspec_names() -> list[str]:
    return sorted(name for name, obj in vars(hookspecs).items()
                  if callable(obj) and hasattr(obj, f"{hookspecs.hookspec.project_name}_spec"))


def doc_sections() -> dict[str, tuple[str, str]]:
    """{hook: (documented arguments, section text)} from the `## hook(args)` headings."""
    text = DOC.read_text()
    matches = list(HEADING.finditer(text))
    sections = {}
    for match, following in zip(matches, matches[1:] + [None]):
        end = following.start() if following else len(text)
        sections[match.group(1)] = (match.group(2), text[match.end():end])
    return sections


def example_module(hook: str) -> types.ModuleType:
    """The python example of a hook's section, executed as a plugin module."""
    blocks = re.findall(r"```python\n(.*?)```", doc_sections()[hook][1], re.DOTALL)
    assert len(blocks) == 1, f"the section of {hook} must have exactly one python example"
    module = types.ModuleType(f"plugin_hooks_doc_{hook}")
    exec(compile(blocks[0], f"docs/plugin_hooks.md ({hook})", "exec"), module.__dict__)
    return module


# ------------------------------------------------------------------------------- meta-tests
def test_the_registry_calls_every_hookspec():
    assert sorted(HOOKS) == hookspec_names()


def test_every_hook_is_documented_with_its_arguments():
    sections = doc_sections()
    assert sorted(sections) == hookspec_names(), "docs/plugin_hooks.md needs one '## hook(args)' section per hook"
    for hook, (documented, text) in sections.items():
        spec_args = ", ".join(inspect.signature(getattr(hookspecs, hook)).parameters)
        assert documented == spec_args, f"{hook}: documented ({documented}), spec ({spec_args})"
        first_line = inspect.getdoc(getattr(hookspecs, hook)).splitlines()[0]
        assert first_line in text, f"{hook}: the section should quote the spec's docstring: {first_line}"


def test_every_hook_has_a_test():
    missing = [hook for hook in hookspec_names() if not callable(globals().get(f"test_hook_{hook}"))]
    assert not missing, f"write test_hook_<name> in {Path(__file__).name} for: {', '.join(missing)}"


@pytest.mark.parametrize("hook", hookspec_names())
def test_documented_example_runs_and_registers(hook):
    module = example_module(hook)
    registry = Registry.build([module], load_entry_points=False, strict=True)
    registered = registry.plugins[module.__name__].registers
    kind = hook.removeprefix("register_")
    assert registered.get(kind), f"the {hook} example registered nothing"


# ------------------------------------------------------------------------ one test per hook
class OnePlugin:
    """A plugin object implementing one hook with a given body."""

    def __init__(self, hook: str, body):
        self.__name__ = f"test-plugin-{hook}"
        setattr(self, hook, hookimpl(specname=hook)(body))


def test_hook_register_terms():
    module = example_module("register_terms")
    registry = Registry.build([module], load_entry_points=False, strict=True)
    entry = registry.terms["code-norm"]
    assert entry.plugin == module.__name__ and entry.description.startswith("0.5 * scale * ||E[z|x]||^2")
    prior = elbokit.make_prior("standard-normal", dim=2, registry=registry)
    objective = elbokit.build_objective("code-norm", prior, options={"code-norm": {"scale": 4.0}}, registry=registry)
    loc = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    out = objective(elbokit.Batch(x=loc, posterior=elbokit.gaussian_posterior(loc, torch.ones_like(loc)), z=loc))
    assert out.per_example.tolist() == [10.0, 2.0]  # 0.5 * 4 * ||mu||^2
    check_term(module.CodeNorm, plugins=[module])


def test_hook_register_priors():
    module = example_module("register_priors")
    registry = Registry.build([module], load_entry_points=False, strict=True)
    prior = elbokit.make_prior("laplace", dim=2, scale=0.5, registry=registry)
    # log p(0) = dim * log(1 / (2 b))
    assert prior.log_prob(torch.zeros(1, 2)).item() == pytest.approx(2 * np.log(1.0))
    check_prior(prior)


def test_hook_register_estimators():
    module = example_module("register_estimators")
    registry = Registry.build([module], load_entry_points=False, strict=True)
    assert registry.estimator("kl", "mc-multi") is module.MultiSampleKL
    prior = elbokit.make_prior("standard-normal", dim=3, registry=registry)
    objective = elbokit.build_objective(
        "kl", prior, options={"kl": {"estimator": "mc-multi", "n_samples": 4000}}, registry=registry)
    torch.manual_seed(0)
    loc, scale = torch.randn(5, 3), torch.rand(5, 3) + 0.5
    posterior = elbokit.gaussian_posterior(loc, scale)
    out = objective(elbokit.Batch(x=loc, posterior=posterior, z=posterior.rsample()))
    exact = torch.distributions.kl_divergence(posterior, prior.distribution())
    assert torch.allclose(out.per_example, exact, atol=0.1)  # Monte Carlo agrees with the closed form
    check_estimator(module.MultiSampleKL, {"n_samples": 2}, plugins=[module])


def test_hook_register_datasets():
    module = example_module("register_datasets")
    registry = Registry.build([module], load_entry_points=False, strict=True)
    entry = registry.dataset("ring")
    assert entry.description == "Noisy points on the unit circle in 2-D; the latent is the angle."
    data = entry.loader(n=200, noise_std=0.0)
    assert isinstance(data, elbokit.Dataset) and data.x.shape == (200, 2)
    assert np.allclose(np.linalg.norm(data.x, axis=1), 1.0)


def test_hook_register_models():
    module = example_module("register_models")
    registry = Registry.build([module], load_entry_points=False, strict=True)
    assert registry.model("linear") is module.LinearGaussian
    assert registry.models["linear"].description.startswith("Linear encoder and decoder")
    assert module.LinearGaussian.option_defaults() == {"min_scale": 1e-3}
    torch.manual_seed(0)
    model = module.LinearGaussian((2, 3), latent_dim=4, min_scale=0.5)
    x = torch.randn(7, 2, 3)
    batch = model(x)
    assert batch.z.shape == (7, 4) and batch.x_recon.shape == (7, 2, 3)
    assert bool((batch.posterior_scale > 0.5).all())  # softplus(.) + min_scale
    # The decoder is affine in z: decode(z) = W z + b, checked against the Linear layer by hand.
    z = torch.randn(5, 4)
    expected = (z @ model.decoder.weight.T + model.decoder.bias).reshape(5, 2, 3)
    assert torch.allclose(model.decode(z), expected)


def test_a_dataset_description_defaults_to_the_loaders_docstring():
    def blobs(n: int = 10):
        """Two Gaussian blobs."""

    def register_datasets(register):
        register("blobs", blobs)

    registry = Registry.build([OnePlugin("register_datasets", register_datasets)], load_entry_points=False, strict=True)
    assert registry.dataset("blobs").description == "Two Gaussian blobs."
