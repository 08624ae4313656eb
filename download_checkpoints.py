"""Download the authors' released checkpoints and unpack them safely into cv/.

    python download_checkpoints.py                        # download, print the SHA-256, unpack
    python download_checkpoints.py --sha256 <digest>      # also check the digest you recorded
    python download_checkpoints.py --archive ~/Downloads/blockdrop-checkpoints.tar.gz   # a copy you have

The tarball comes from the first URL that serves an intact gzip file, through torch.hub's
downloader (a temporary file beside ``--archive``, moved into place when complete). Before
anything is unpacked the tarball must pass gzip's CRC check and match ``--sha256`` when given.
tarfile's ``data`` filter unpacks it into a temporary folder inside ``--dest``; the files move into
place only when every member passed and no file of ``--dest`` would change without ``--overwrite``.
The tarball's top-level ``cv/`` folder maps onto ``--dest``.
"""

import argparse
import gzip
import hashlib
import os
import re
import socket
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

from core.cli import ArgumentParser, HelpFormatter, UserError, check_output_dir, float_in, run
from core.cli import path as path_arg

URLS = (
    "https://www.cs.utexas.edu/~tushar/blockdrop/blockdrop-checkpoints.tar.gz",
    "https://utexas.box.com/shared/static/ok98i51v14c0q9lvs1z5g71m6b3zm8sj.gz",
)
CHUNK = 1 << 20
MAX_LINK = 1024  # longer link targets are refused (tarfile copies a link it cannot make)


def sha256_hex(text: str) -> str:
    """argparse type of ``--sha256``: 64 hexadecimal digits."""
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise argparse.ArgumentTypeError(f"must be 64 hexadecimal digits, got {text!r}")
    return text.lower()


def get_args_parser():
    p = ArgumentParser(
        description="Download the authors' released BlockDrop checkpoints and unpack them into cv/.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--url",
        action="append",
        metavar="URL",
        help="where to download from (http, https or file URL); repeat for fallbacks, tried in order "
        "(default: the two URLs of the original README)",
    )
    p.add_argument(
        "--archive",
        type=path_arg,
        default="cv/blockdrop-checkpoints.tar.gz",
        help="where the tarball is kept; if this file exists it is used as it is, without downloading",
    )
    p.add_argument(
        "--dest", type=path_arg, default="cv/", help="folder to unpack into (the tarball's top-level cv/ maps onto it)"
    )
    p.add_argument(
        "--sha256", type=sha256_hex, help="expected SHA-256 of the tarball; nothing is unpacked if it differs"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files in --dest that differ from the tarball's (default: stop)",
    )
    p.add_argument(
        "--timeout",
        type=float_in(0, 86_400),
        default=30.0,
        help="seconds to wait for a server to answer (at most a day)",
    )
    return p


def _reason(e: BaseException) -> str:
    reason = getattr(e, "reason", None)  # urllib's errors
    text = f"HTTP {e.code} {reason}" if hasattr(e, "code") and reason else str(reason or e)
    return (text or type(e).__name__).splitlines()[0]


def missing_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first (to remove them after a failure)."""
    return [p for p in [path, *path.parents] if not os.path.lexists(p)]


def remove_empty(folders: list[Path]) -> None:
    """Remove what this run created of ``folders`` (deepest first), where nothing was put."""
    for folder in folders:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def gzip_problem(path: Path) -> str | None:
    """Why ``path`` is not an intact gzip stream (tarfile alone stops quietly at damage), or None."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(CHUNK):
                pass
    except EOFError:
        return "the gzip stream ends early"
    except (OSError, zlib.error) as e:
        return f"not an intact gzip file ({_reason(e)})"
    return None


def download(urls: list[str], archive: Path, timeout: float) -> str:
    """Fetch the archive from the first URL that serves an intact gzip file; returns that URL."""
    import torch.hub  # only here: the rest of the script needs no torch

    socket.setdefaulttimeout(timeout)
    made = missing_folders(archive.parent)
    failures = []
    for url in urls:
        try:
            archive.parent.mkdir(parents=True, exist_ok=True)  # torch.hub writes its temporary file there
            torch.hub.download_url_to_file(url, str(archive), progress=sys.stderr.isatty())
        except Exception as e:  # HTTP and URL errors, refused connections, cut transfers, full disks
            failures.append(f"{url}: {_reason(e)}")
            continue
        problem = gzip_problem(archive)
        if problem is None:
            return url
        archive.unlink()
        failures.append(f"{url}: {problem}")
    remove_empty(made)  # a failed download leaves no trace
    raise UserError(
        f"could not download {archive.name}: {'; '.join(failures)}. "
        f"Check the network, or fetch the file by other means and pass --archive FILE"
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def refused(member: tarfile.TarInfo, why: str) -> UserError:
    return UserError(f"refused: member {member.name!r} {why}; nothing was unpacked")


def check_names(members: list[tarfile.TarInfo]) -> None:
    """Check every member's name and kind before anything is written; the ``data`` filter checks the rest.

    Refused: absolute names and link targets and any ``..`` in them (so a name is one path, and a
    link can only point down from its own folder, also once the top-level ``cv/`` is stripped);
    empty, overlong or NUL ones; special files; a name used twice; a name under a file or link of
    the archive, or a file or link over names of it; a top-level ``cv`` that is not a folder.
    """
    seen, not_dirs, under = set(), set(), set()
    for m in members:
        paths = [("name", m.name)] + ([("link target", m.linkname)] if m.issym() or m.islnk() else [])
        for what, path in paths:
            if not path or "\0" in path or len(path) > MAX_LINK:
                raise refused(m, f"has an empty, overlong or NUL {what}")
            if path.startswith("/") or re.match(r"[A-Za-z]:", path) or ".." in PurePosixPath(path).parts:
                raise refused(m, f"has an absolute or '..' {what}")
        if m.ischr() or m.isblk() or m.isfifo():
            raise refused(m, "is a special file")
        parts = PurePosixPath(m.name).parts
        name = "/".join(parts)
        if name in seen:
            raise refused(m, "appears twice in the archive")
        prefixes = {"/".join(parts[:i]) for i in range(1, len(parts))}
        if prefixes & not_dirs:
            raise refused(m, "lies under a file or link of the archive")
        if name in under and not m.isdir():
            raise refused(m, "is a file or link, and other members lie under it")
        if name == "cv" and not m.isdir():
            raise refused(m, "is not a folder, yet it is the archive's top level")
        seen.add(name)
        under |= prefixes
        if not m.isdir():
            not_dirs.add(name)


def _resolves_inside(target: Path, dest: Path, root: Path, source: Path) -> bool:
    """Whether the archive's link ``source``, moved to ``target`` in ``dest``, points into ``dest``
    without going through another link (one of ``dest``'s, or one of the archive's under ``root``)."""
    parts = PurePosixPath(os.readlink(source)).parts
    folder = target.parent
    for i in range(1, len(parts) + 1):
        step = folder.joinpath(*parts[:i])
        if step.is_symlink() or (root / step.relative_to(dest)).is_symlink():
            return False
    return True


def _same(source: Path, target: Path) -> bool:
    """Whether ``target`` already holds ``source`` (a file or a link), unchanged."""
    if source.is_symlink():
        return target.is_symlink() and os.readlink(target) == os.readlink(source)
    same_size = target.is_file() and not target.is_symlink() and target.stat().st_size == source.stat().st_size
    return same_size and sha256_of(target) == sha256_of(source)


def plan_moves(root: Path, dest: Path) -> tuple[list[tuple[Path, Path]], int, list[Path]]:
    """Files and links unpacked under ``root``, against ``dest`` as it is.

    Returns ((source, target) moves, the number already there and identical, existing targets
    that differ). Refused: a target reached through a link that leads out of ``dest``, a file
    where ``dest`` has a folder, and a folder where it has a file.
    """
    real_dest = os.path.realpath(dest)
    moves, same, conflicts = [], 0, []
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            source = Path(folder) / name
            target = dest / source.relative_to(root)
            if os.path.commonpath([real_dest, os.path.realpath(target.parent)]) != real_dest:
                raise UserError(f"refused: {target} leads outside {dest}; nothing was unpacked")
            is_folder = source.is_dir() and not source.is_symlink()
            if os.path.lexists(target) and is_folder != (target.is_dir() and not target.is_symlink()):
                kind = "folder" if is_folder else "file"
                raise UserError(f"refused: the archive has a {kind} where {target} is not one; nothing was unpacked")
            if is_folder:
                continue
            if source.is_symlink() and not _resolves_inside(target, dest, root, source):
                raise UserError(f"refused: the link {target} goes through another link; nothing was unpacked")
            if not os.path.lexists(target):
                moves.append((source, target))
            elif _same(source, target):
                same += 1
            else:
                moves.append((source, target))
                conflicts.append(target)
    return moves, same, conflicts


def unpack(archive: Path, dest: Path, overwrite: bool) -> tuple[int, int]:
    """Unpack ``archive`` into ``dest``; returns (files written, files already there and identical)."""
    problem = gzip_problem(archive)
    if problem:
        raise UserError(f"{archive} is not a complete tar.gz archive ({problem}): delete it and download it again")
    made = missing_folders(dest)
    moved = 0
    try:
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "r:gz") as tar, tempfile.TemporaryDirectory(dir=dest, prefix=".unpack-") as tmp:
            members = tar.getmembers()
            if not members:
                raise UserError(f"{archive} holds no files")
            check_names(members)
            tar.errorlevel = 2  # a member tarfile cannot make is an error, not a warning
            tar.extractall(tmp, filter="data")
            tops = {PurePosixPath(m.name).parts[:1] for m in members} - {(".",), ()}
            root = Path(tmp) / "cv" if tops == {("cv",)} else Path(tmp)  # the top-level cv/ maps onto dest
            moves, same, conflicts = plan_moves(root, dest)
            if conflicts and not overwrite:
                raise UserError(
                    f"{len(conflicts)} file(s) in {dest} differ from the archive's (first: {conflicts[0]}); "
                    f"nothing was unpacked: move them away or pass --overwrite"
                )
            # Each file is moved into place complete: a file in dest is the old one or the new one.
            for source, target in moves:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
                moved += 1
    except (UserError, tarfile.TarError, OSError, ValueError, OverflowError, EOFError, zlib.error) as e:
        remove_empty(made)  # a refused archive leaves no trace
        if isinstance(e, UserError):
            raise
        if isinstance(e, tarfile.FilterError):
            raise UserError(f"refused: {e}; nothing was unpacked") from None
        done = f"{moved} file(s) were moved into place before this" if moved else "nothing was unpacked"
        raise UserError(f"cannot unpack {archive} into {dest} ({_reason(e)}); {done}") from None
    return len(moves), same


def main(args) -> None:
    if not hasattr(tarfile, "data_filter"):
        raise UserError("unpacking safely needs tarfile's extraction filters: Python 3.10.12+, 3.11.4+ or 3.12+")
    archive, dest = Path(args.archive), Path(args.dest)
    check_output_dir(dest, "--dest")
    check_output_dir(archive.parent, "--archive")
    if archive.is_file():
        print(f"using {archive} (already here; delete it to download again)", flush=True)
    elif archive.exists():
        raise UserError(f"--archive {archive} exists and is not a file")
    else:
        url = download(args.url or list(URLS), archive, args.timeout)
        print(f"downloaded {archive} from {url}", flush=True)
    try:
        digest = sha256_of(archive)
    except OSError as e:
        raise UserError(f"cannot read {archive} ({e.strerror})") from None
    print(f"sha256 {digest}  {archive}", flush=True)
    if args.sha256 and digest != args.sha256:
        raise UserError(
            f"{archive} has SHA-256 {digest}, not the expected {args.sha256}: nothing was unpacked "
            f"(delete it to download again)"
        )
    written, kept = unpack(archive, dest, args.overwrite)
    print(f"unpacked {written} file(s) into {dest}" + (f"; {kept} already there and identical" if kept else ""))
    pretrained = dest / "pretrained"
    if pretrained.is_dir():
        models = sorted(d.name for d in pretrained.iterdir() if d.is_dir() and any(f.is_file() for f in d.iterdir()))
        if models:
            print(f"base models in {pretrained}: {', '.join(models)}")


def interruptible(args) -> None:
    try:
        main(args)
    except KeyboardInterrupt:
        print("\ninterrupted: nothing half-written is kept; run the same command again", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run(interruptible, get_args_parser())
