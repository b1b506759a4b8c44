"""Built-in datasets (filled in by elbokit.data)."""

from elbokit.hookspecs import hookimpl


@hookimpl
def register_datasets(register):
    pass
