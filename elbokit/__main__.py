"""`python -m elbokit ...` runs the command line (and `torchrun ... -m elbokit train ...`)."""

from elbokit.cli import console_main

console_main()
