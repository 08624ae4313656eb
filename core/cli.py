"""Command-line plumbing shared by every script, without importing torch (so it starts at once).

Bad input is a ``UserError``: ``run`` prints it as one line on stderr and exits with code 2.
"""

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path


class UserError(Exception):
    """Bad input from the user: the scripts print it as one line and exit with code 2.

    ``every_process``: under torchrun, a problem of this process alone (e.g. its GPU), printed by
    it rather than only by the first process of its node.
    """

    def __init__(self, message: str, every_process: bool = False):
        super().__init__(message)
        self.every_process = every_process


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default at the end of its help, unless the help says it already or there is none."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


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


def bounded_int(low: int, high: int):
    """argparse type: an integer in [low, high]."""
    return _typed(lambda v: low <= v <= high, int, f"an integer in [{low:,}, {high:,}]")


def float_in(low: float, high: float):
    """argparse type: a number in (low, high]."""
    return _typed(lambda v: low < v <= high, float, f"a number in ({low:g}, {high:g}]")


# Sizes are bounded where a larger one cannot fit in memory: a batch of more than 65,536 images,
# 100 million epochs or images, figures of more than 1,200 dots per inch.
MAX_BATCH = 65_536
MAX_COUNT = 100_000_000
SEED_MAX = 2**32 - 1  # NumPy's seeds

positive_int = bounded_int(1, MAX_COUNT)
non_negative_int = bounded_int(0, MAX_COUNT)
batch_size = bounded_int(1, MAX_BATCH)
seed = bounded_int(0, SEED_MAX)
dpi = bounded_int(10, 1200)
positive_float = _typed(lambda v: math.isfinite(v) and v > 0, float, "a positive finite number")
non_negative_float = _typed(lambda v: math.isfinite(v) and v >= 0, float, "a finite number >= 0")
finite_float = _typed(math.isfinite, float, "a finite number")
probability = _typed(lambda v: 0.5 < v <= 1, float, "a number in (0.5, 1]")
drop_probability = _typed(lambda v: 0 <= v < 1, float, "a number in [0, 1)")
fraction = _typed(lambda v: 0 <= v <= 1, float, "a number in [0, 1]")
path = _typed(lambda v: v.strip() != "", str, "a non-empty path")


def run(
    main: Callable[[argparse.Namespace], object], parser: argparse.ArgumentParser, argv: Iterable[str] | None = None
):
    """Parse the command line and run ``main``; a UserError becomes one line on stderr and exit code 2.

    Under torchrun the first process of each node prints it (the others hit the same error), unless
    the error is the process's own (``every_process``).
    Ctrl-C ends with one line (what is kept, how to go on) and exit code 130; a failed write or
    read of the file system (a full disk, a folder that cannot be written) with one line and exit code 2.
    """
    args = parser.parse_args(argv)
    try:
        return main(args)
    except UserError as e:
        if os.environ.get("LOCAL_RANK", "0") == "0" or e.every_process:
            print(f"{parser.prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        resume = " (a training run: the same command with --resume goes on from its last finished epoch)"
        print(
            f"\n{parser.prog}: interrupted: the files already written are complete and kept"
            f"{resume if hasattr(args, 'resume') else ''}",
            file=sys.stderr,
        )
        sys.exit(130)
    except MemoryError:
        print(f"{parser.prog}: error: out of memory: try a smaller --batch_size (or fewer images)", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:  # PyTorch's allocators report running out of memory as RuntimeErrors
        if "out of memory" not in str(e).lower() and "can't allocate memory" not in str(e):
            raise
        print(
            f"{parser.prog}: error: out of memory ({str(e).splitlines()[0][:120]}): try a smaller --batch_size",
            file=sys.stderr,
        )
        sys.exit(2)
    except OSError as e:
        where = f" ({e.filename})" if e.filename else ""
        print(f"{parser.prog}: error: {e.strerror or e}{where}; nothing half-written is left", file=sys.stderr)
        sys.exit(2)


def memory_bytes() -> int:
    """The machine's physical memory in bytes (0 where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_fits(nbytes: int, what: str) -> None:
    """The stated rule for sizes: what a flag makes the program hold at once must fit in half of the
    machine's memory; otherwise one line, before any work."""
    limit = memory_bytes() // 2
    if limit and nbytes > limit:
        raise UserError(
            f"{what} take {nbytes / 2**30:.1f} GiB, more than half of this machine's {limit / 2**29:.0f} GiB of memory"
        )


def check_output_dir(folder: str | os.PathLike, flag: str) -> None:
    """Refuse, before any work, an output folder that cannot be written: a file, a special file
    system, a read-only or full one. Writes nothing: it tries a temporary file in the folder, or in
    its nearest existing parent when the folder is still to be made, and removes it."""
    folder = Path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise UserError(f"{flag} {folder}: {existing} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UserError(f"{flag} {folder}: cannot write in {existing} ({e.strerror or e})") from None
