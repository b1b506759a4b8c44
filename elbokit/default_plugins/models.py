"""Built-in models: `mlp` (the paper's, the default for flat data) and `conv` (for (C, H, W) images)."""

from elbokit.hookspecs import hookimpl


@hookimpl
def register_models(register):
    from elbokit.models import MLP, ConvVAE

    register(MLP)
    register(ConvVAE)
