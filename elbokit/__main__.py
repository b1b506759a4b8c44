"""`python -m elbokit ...` runs the command line, as the `elbokit` console script does
(and `torchrun ... -m elbokit train ...` runs a distributed training)."""

from elbokit.cli import console_main

if __name__ == "__main__":
    console_main()
