"""Download the authors' released checkpoints and unpack them safely into cv/.

    python download_checkpoints.py                        # download (resumable), print the SHA-256, unpack
    python download_checkpoints.py --sha256 <digest>      # also check the digest you recorded
    python download_checkpoints.py --archive ~/Downloads/blockdrop-checkpoints.tar.gz   # a copy you have

The tarball is fetched from the first URL that answers with a gzip file, into ``<archive>.part``,
which a later run resumes (HTTP Range), and moved to ``--archive`` only once gzip's CRC check
passes. Unpacking checks every member before writing anything (see ``plan_unpack``), unpacks
into a temporary folder inside ``--dest`` and moves each file into place. The tarball's top-level
``cv/`` folder maps onto ``--dest``. Needs no torch: it starts at once.
"""

import argparse
import gzip
import hashlib
import http.client
import os
import re
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from cli import ArgumentParser, UserError, positive_float, run

URLS = (
    "https://www.cs.utexas.edu/~tushar/blockdrop/blockdrop-checkpoints.tar.gz",
    "https://utexas.box.com/shared/static/ok98i51v14c0q9lvs1z5g71m6b3zm8sj.gz",
)
CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ATTEMPTS = 3  # per URL, each resuming where the previous one stopped
MAX_PATH = 1024  # longer member names or link targets are refused


class Unavailable(Exception):
    """A URL that does not answer with the archive: try the next one."""


class Interrupted(Exception):
    """The transfer stopped midway: what arrived is kept in the .part file."""


class Restart(Exception):
    """The partial file cannot be continued: start the download over."""


def sha256_hex(text: str) -> str:
    """argparse type of ``--sha256``: 64 hexadecimal digits."""
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise argparse.ArgumentTypeError(f"must be 64 hexadecimal digits, got {text!r}")
    return text.lower()


def get_args_parser():
    p = ArgumentParser(
        description="Download the authors' released BlockDrop checkpoints and unpack them into cv/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
        default="cv/blockdrop-checkpoints.tar.gz",
        help="where the tarball is kept; if this file exists it is used as it is, without downloading",
    )
    p.add_argument("--dest", default="cv/", help="folder to unpack into (the tarball's top-level cv/ maps onto it)")
    p.add_argument(
        "--sha256", type=sha256_hex, help="expected SHA-256 of the tarball; nothing is unpacked if it differs"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace files in --dest that differ from the tarball's (default: stop)",
    )
    p.add_argument("--timeout", type=positive_float, default=30.0, help="seconds to wait for a server to answer")
    return p


# ---------------------------------------------------------------------------------------------
# Download


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return (str(e) or type(e).__name__).splitlines()[0]


def _open(url: str, start: int, timeout: float):
    """The server's answer for the bytes from ``start`` on; None if the partial file is complete."""
    headers = {"User-Agent": "blockdrop-download"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # nothing after `start`: complete, or longer than the server's file
            total = re.fullmatch(r"bytes \*/(\d+)", e.headers.get("Content-Range", "") or "")
            if total and int(total.group(1)) == start:
                return None
            raise Restart(f"the server's file is not {start} bytes or more") from None
        raise Unavailable(_reason(e)) from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        raise Unavailable(_reason(e)) from None


def _read(response, size: int) -> tuple[bytes, BaseException | None]:
    """Up to ``size`` bytes, as soon as some arrive; with the error that cut the transfer, if any."""
    try:
        return getattr(response, "read1", response.read)(size), None
    except http.client.IncompleteRead as e:
        return e.partial, e
    except (OSError, http.client.HTTPException) as e:
        return b"", e


def fetch(url: str, part: Path, timeout: float) -> bool:
    """Append the rest of ``url`` to ``part`` (all of it if the server cannot resume).

    Returns whether the server confirmed that ``part`` now has its whole length.
    """
    start = part.stat().st_size if part.exists() else 0
    response = _open(url, start, timeout)
    if response is None:
        return True
    with response:
        if start and getattr(response, "status", None) == 206:
            sent = re.match(r"bytes (\d+)-", response.headers.get("Content-Range") or "")
            if not sent or int(sent.group(1)) != start:
                raise Restart("the server answered with another range")
        else:
            start = 0  # the server sends the whole file: start over
        length = response.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        chunk, error = _read(response, 1 << 16)
        if start == 0 and not chunk.startswith(GZIP_MAGIC):
            if error is not None and not chunk:
                raise Unavailable(_reason(error))
            kind = response.headers.get("Content-Type") or "unknown type"
            raise Unavailable(f"it answered with something that is not a gzip file ({kind})")
        try:
            part.parent.mkdir(parents=True, exist_ok=True)
            f = open(part, "ab" if start else "wb")
        except OSError as e:
            raise UserError(f"cannot write {part} ({e.strerror})") from None
        bar = tqdm(
            total=total,
            initial=start,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.name.removesuffix(".part"),
            dynamic_ncols=True,
            disable=None,  # on a terminal only: logs get the summary lines
        )
        with f, bar:
            while chunk:
                try:
                    f.write(chunk)
                except OSError as e:
                    raise UserError(
                        f"cannot write {part} ({e.strerror}); {f.tell()} bytes kept: free space and run again"
                    ) from None
                bar.update(len(chunk))
                if error is not None:
                    break
                chunk, error = _read(response, CHUNK)
    if error is not None:
        raise Interrupted(_reason(error))
    size = part.stat().st_size
    if total is not None and size != total:
        raise Interrupted(f"got {size} of {total} bytes")
    return total is not None


def check_gzip(path: Path, complete: bool) -> None:
    """Read the whole gzip stream and check its CRC.

    A stream that ends early is Interrupted (resume), unless the server said the file is complete;
    corrupt bytes, or a complete file that still ends early, need a Restart.
    """
    try:
        with gzip.open(path, "rb") as f:
            while f.read(CHUNK):
                pass
    except EOFError:
        if complete:
            raise Restart("the file ends early although the server has no more of it") from None
        raise Interrupted("the gzip stream ends early") from None
    except (OSError, zlib.error) as e:
        raise Restart(f"the downloaded bytes are corrupt ({_reason(e)})") from None


def download(urls: list[str], archive: Path, timeout: float) -> str:
    """Fetch the archive from the first URL that has it; returns that URL.

    A transfer that stops is resumed (``ATTEMPTS`` times per URL); a partial file that the server
    cannot continue, or whose assembled bytes fail gzip's checks, is started over once.
    """
    part = archive.with_name(archive.name + ".part")
    failures = []
    for url in urls:
        answered, restarted, stops = False, False, 0
        while True:
            try:
                complete = fetch(url, part, timeout)
                answered = True
                check_gzip(part, complete)
            except Unavailable as e:
                if not answered:
                    failures.append(f"{url}: {e}")
                    break
                raise UserError(f"{url} stopped answering ({e}); {_kept(part)}") from None
            except Restart as e:
                if restarted:
                    raise UserError(f"{url}: {e}, even after starting over") from None
                print(f"{part}: {e}; starting over", file=sys.stderr, flush=True)
                try:
                    part.unlink(missing_ok=True)
                except OSError as err:
                    raise UserError(f"cannot remove {part} ({err.strerror})") from None
                answered, restarted = True, True
                continue
            except Interrupted as e:
                answered = True
                stops += 1
                if stops < ATTEMPTS:
                    print(f"transfer stopped ({e}); resuming", file=sys.stderr, flush=True)
                    continue
                raise UserError(f"the download from {url} keeps stopping ({e}); {_kept(part)}") from None
            os.replace(part, archive)
            return url
    raise UserError(
        f"could not download {archive.name}: {'; '.join(failures)}. "
        f"Check the network, or fetch the file by other means and pass --archive FILE"
    )


def _kept(part: Path) -> str:
    size = part.stat().st_size if part.is_file() else 0
    return f"{size} bytes are kept in {part}: run the same command again to resume"


def _sha256(f) -> str:
    digest = hashlib.sha256()
    while block := f.read(CHUNK):
        digest.update(block)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return _sha256(f)


# ---------------------------------------------------------------------------------------------
# Unpacking


def refused(member: tarfile.TarInfo, why: str) -> UserError:
    return UserError(f"refused: member {member.name!r} {why}; nothing was unpacked")


def _parts(member: tarfile.TarInfo, path: str, what: str) -> list[str]:
    """The parts of a member's name or link target: relative, without ``..``, without NUL."""
    if "\0" in path:
        raise refused(member, f"has a NUL byte in its {what}")
    shown = "" if path == member.name else f" ({path!r})"
    if not path or len(path) > MAX_PATH:
        raise refused(member, f"has an empty or overlong {what}")
    if path.startswith("/") or re.match(r"[A-Za-z]:", path):
        raise refused(member, f"has an absolute {what}{shown}")
    parts = [p for p in PurePosixPath(path).parts if p != "."]
    if ".." in parts:
        raise refused(member, f"has '..' in its {what}{shown}")
    return parts


def _prefixes(name: str) -> list[str]:
    parts = name.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def _same_file(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path) -> bool:
    """Whether ``target`` already holds this file or link, unchanged."""
    if member.issym():
        return target.is_symlink() and os.readlink(target) == member.linkname
    if not target.is_file() or target.is_symlink() or target.stat().st_size != member.size:
        return False
    with tar.extractfile(member) as f:
        return _sha256(f) == sha256_of(target)


def plan_unpack(tar: tarfile.TarFile, dest: Path) -> tuple[list[tarfile.TarInfo], int, list[Path]]:
    """Check every member against ``dest`` as it is, before anything is written.

    Returns (members to write, renamed relative to ``dest``, hard links turned into copies of the
    file they name; the number of files already there and identical; existing files that differ).

    Refused, as a UserError: absolute names and link targets, and any ``..`` in them (so a name is
    one path, and a link can only point down from its own folder); what tarfile's ``data`` filter
    refuses against ``dest`` as it is (a name or link that resolves outside, through links already
    in ``dest`` too; device files); names used twice, names under a file or link of the archive
    (the filter cannot see a link that does not exist yet); files where ``dest`` has a folder and
    folders where it has a file.
    """
    members = tar.getmembers()
    if not members:
        raise UserError(f"{tar.name} holds no files")
    parts = [_parts(m, m.name, "name") for m in members]
    strip = int(any(parts) and all(p[0] == "cv" for p in parts if p))  # the top-level cv/ maps onto dest
    real_dest = os.path.realpath(dest)
    by_name: dict[str, tarfile.TarInfo] = {}  # archive names, for hard links
    not_dirs: set[str] = set()  # files and links of the archive: nothing may lie under them
    under: set[str] = set()  # every folder that names pass through
    dirs: set[str] = set()  # folder members
    todo, same, conflicts = [], 0, []
    for member, p in zip(members, parts, strict=True):
        by_name["/".join(p)] = member
        name = "/".join(p[strip:])
        if not name:
            if not member.isdir():
                raise refused(member, "is not a folder, yet it is the archive's top level")
            continue
        if name in not_dirs or (name in dirs and not member.isdir()):
            raise refused(member, "appears twice in the archive")
        if name in under and not member.isdir():
            raise refused(member, "is a file or link, and other members lie under it")
        through = [d for d in _prefixes(name) if d in not_dirs]
        if through:
            raise refused(member, f"lies under {through[0]!r}, a file or link of the archive")
        source = member
        if member.issym():
            _parts(member, member.linkname, "link target")
        elif member.islnk():  # unpacked as a copy of the file it names, which came earlier
            source = by_name.get("/".join(_parts(member, member.linkname, "link target")))
            if source is None or not source.isfile():
                raise refused(member, f"is a hard link to {member.linkname!r}, which is not a file before it")
        try:
            checked = tarfile.data_filter(source.replace(name=name, deep=False), real_dest)
        except tarfile.FilterError as e:
            raise refused(member, f"is unsafe: {e}") from None
        except ValueError as e:
            raise refused(member, f"has an invalid name or link ({e})") from None
        if checked is None:
            continue
        if not isinstance(checked.mtime, int | float) or not 0 <= checked.mtime < 2**40:
            raise refused(member, f"has an invalid time stamp ({checked.mtime!r})")
        under.update(_prefixes(name))
        if checked.isdir():
            dirs.add(name)
        else:
            not_dirs.add(name)
        blocked = [d for d in _prefixes(name) if os.path.lexists(dest / d) and not (dest / d).is_dir()]
        if blocked:
            raise refused(member, f"lies under {dest / blocked[0]}, which is a file")
        target = dest / name
        if not os.path.lexists(target):
            todo.append(checked)
        elif checked.isdir() or (target.is_dir() and not target.is_symlink()):
            if not (checked.isdir() and target.is_dir()):
                kind = "folder" if checked.isdir() else "file"
                raise refused(member, f"is a {kind}, and {target} is not (never replaced)")
            todo.append(checked)  # an existing folder: nothing to replace
        elif _same_file(tar, checked, target):
            same += 1
        else:
            todo.append(checked)
            conflicts.append(target)
    return todo, same, conflicts


def _inside(path: Path, real_dest: str) -> bool:
    return os.path.commonpath([real_dest, os.path.realpath(path)]) == real_dest


def _check_archive(archive: Path) -> None:
    """The whole archive must be an intact gzip stream: tarfile alone stops quietly at damage."""
    with open(archive, "rb") as f:
        if f.read(2) != GZIP_MAGIC:
            raise UserError(f"{archive} is not a tar.gz archive: delete it and download it again")
    try:
        check_gzip(archive, complete=True)
    except Restart as e:
        raise UserError(f"{archive} is incomplete or corrupt ({e}): delete it and download it again") from None


def unpack(archive: Path, dest: Path, overwrite: bool) -> tuple[int, int]:
    """Unpack ``archive`` into ``dest``; returns (files written, files already there and identical).

    ``archive`` must be intact (``download`` checks it; ``main`` checks one it did not download).
    """
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {dest} ({e.strerror})") from None
    moved = 0
    try:
        with tarfile.open(archive, "r:gz") as tar:
            todo, same, conflicts = plan_unpack(tar, dest)
            if conflicts and not overwrite:
                raise UserError(
                    f"{len(conflicts)} file(s) in {dest} differ from the archive's (first: {conflicts[0]}); "
                    f"nothing was unpacked: move them away or pass --overwrite"
                )
            # Unpack beside the destination, then move each file into place: a file in `dest` is
            # the old one or the complete new one, never half written. Links are made here, not by
            # tarfile (whose fallback for a link it cannot make copies a member unfiltered).
            with tempfile.TemporaryDirectory(dir=dest, prefix=".unpack-") as tmp:
                tar.extractall(tmp, members=[m for m in todo if not m.issym()], filter="data")
                real_dest = os.path.realpath(dest)
                folders = {dest / d for m in todo for d in _prefixes(m.name)} | {
                    dest / m.name for m in todo if m.isdir()
                }
                for folder in sorted(folders, key=lambda f: len(f.parts)):  # checked by plan_unpack; again here
                    if not _inside(folder, real_dest):
                        raise UserError(f"refused: {folder} leads outside {dest}; nothing was unpacked")
                    folder.mkdir(exist_ok=True)
                device = os.stat(tmp).st_dev
                for folder in {(dest / m.name).parent for m in todo if not m.isdir()}:
                    if os.stat(folder).st_dev != device or not os.access(folder, os.W_OK):
                        raise UserError(f"cannot move files into {folder} (another file system or read-only)")
                files = [m for m in todo if not m.isdir()]
                for i, member in enumerate(files):
                    source = Path(tmp) / member.name
                    if member.issym():
                        source = Path(tmp) / f".link-{i}"
                        os.symlink(member.linkname, source)
                    os.replace(source, dest / member.name)
                    moved += 1
    except UserError:
        raise
    except tarfile.FilterError as e:
        raise UserError(f"refused: {e}; nothing was unpacked") from None
    except tarfile.ReadError:
        raise UserError(f"{archive} is not a tar.gz archive: delete it and download it again") from None
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise UserError(
            f"{archive} is not a complete tar.gz archive ({_reason(e)}); delete it and download it again"
        ) from None
    except (OSError, ValueError, OverflowError) as e:
        where = f" {e.filename!r}" if getattr(e, "filename", None) else ""
        done = f"{moved} file(s) were moved into place before this" if moved else "nothing was unpacked"
        raise UserError(f"cannot unpack into {dest}:{where} {getattr(e, 'strerror', None) or e}; {done}") from None
    return sum(not m.isdir() for m in todo), same


# ---------------------------------------------------------------------------------------------


def main(args) -> None:
    if not hasattr(tarfile, "data_filter"):
        raise UserError("unpacking safely needs tarfile's extraction filters: Python 3.10.12+, 3.11.4+ or 3.12+")
    archive = Path(args.archive)
    dest = Path(args.dest)
    downloaded = not archive.is_file()
    if not downloaded:
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
    if not downloaded:
        _check_archive(archive)  # a downloaded one passed check_gzip already
    written, kept = unpack(archive, dest, args.overwrite)
    print(f"unpacked {written} file(s) into {dest}" + (f"; {kept} already there and identical" if kept else ""))
    try:
        pretrained = dest / "pretrained"
        folders = sorted(d for d in pretrained.iterdir() if d.is_dir()) if pretrained.is_dir() else []
        models = [
            d.name if d.name.isprintable() else repr(d.name) for d in folders if any(f.is_file() for f in d.iterdir())
        ]
    except OSError:
        models = []  # only a summary
    if models:
        print(f"base models in {pretrained}: {', '.join(models)}")


def interruptible(args) -> None:
    try:
        main(args)
    except KeyboardInterrupt:
        part = Path(args.archive + ".part")
        print(f"\ninterrupted{'; ' + _kept(part) if part.is_file() else ''}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run(interruptible, get_args_parser())
