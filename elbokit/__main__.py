"""`python -m elbokit ...` runs the command line, as the `elbokit` console script does."""

from elbokit.cli import console_main

if __name__ == "__main__":
    console_main()
