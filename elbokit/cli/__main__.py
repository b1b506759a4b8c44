"""`python -m elbokit.cli ...` runs the command line."""

from elbokit.cli import console_main

console_main()
