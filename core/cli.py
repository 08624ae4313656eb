"""Command-line plumbing shared by every script, without importing torch (so it starts at once).

Bad input is a ``UserError``: ``run`` prints it as one line on stderr and exits with code 2.
"""

import argparse
import os
import sys
from collections.abc import Callable, Iterable


class UserError(Exception):
    """Bad input from the user: the scripts print it as one line and exit with code 2.

    ``every_process``: under torchrun, a problem of this process alone (e.g. its GPU), printed by
    it rather than only by the first process of its node.
    """

    def __init__(self, message: str, every_process: bool = False):
        super().__init__(message)
        self.every_process = every_process


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports bad input in one line (no usage block) with exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _typed(check: Callable[[float], bool], cast, what: str):
    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


positive_int = _typed(lambda v: v > 0, int, "a positive integer")
non_negative_int = _typed(lambda v: v >= 0, int, "a non-negative integer")
positive_float = _typed(lambda v: v > 0, float, "a positive number")
non_negative_float = _typed(lambda v: v >= 0, float, "a non-negative number")
probability = _typed(lambda v: 0.5 < v <= 1, float, "a number in (0.5, 1]")
drop_probability = _typed(lambda v: 0 <= v < 1, float, "a number in [0, 1)")
fraction = _typed(lambda v: 0 <= v <= 1, float, "a number in [0, 1]")


def run(
    main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser, argv: Iterable[str] | None = None
):
    """Parse the command line and run ``main``; a UserError becomes one line on stderr and exit code 2.

    Under torchrun the first process of each node prints it (the others hit the same error), unless
    the error is the process's own (``every_process``).
    """
    args = parser.parse_args(argv)
    try:
        return main(args)
    except UserError as e:
        if os.environ.get("LOCAL_RANK", "0") == "0" or e.every_process:
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
