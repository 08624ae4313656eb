"""Download the authors' released checkpoints and unpack them safely into cv/.

    python download_checkpoints.py                        # download (resumable), print the SHA-256, unpack
    python download_checkpoints.py --sha256 <digest>      # also check the digest you recorded
    python download_checkpoints.py --archive ~/Downloads/blockdrop-checkpoints.tar.gz   # a copy you have

The tarball is fetched from the first URL that answers with a gzip file, into ``<archive>.part``,
which a later run resumes (HTTP Range), and moved to ``--archive`` only once complete. Unpacking
checks every member before writing anything: absolute names, names or links that would land
outside ``--dest`` and device files are refused (tarfile's ``data`` extraction filter), and files
already in ``--dest`` are never replaced unless ``--overwrite`` is given (identical ones are
skipped). The tarball's top-level ``cv/`` folder maps onto ``--dest``.
"""

import argparse
import filecmp
import hashlib
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

import utils

URLS = (
    "https://www.cs.utexas.edu/~tushar/blockdrop/blockdrop-checkpoints.tar.gz",
    "https://utexas.box.com/shared/static/ok98i51v14c0q9lvs1z5g71m6b3zm8sj.gz",
)
CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ATTEMPTS = 3  # per URL, each resuming where the previous one stopped


class Unavailable(Exception):
    """A URL that does not answer with the archive: try the next one."""


class Interrupted(Exception):
    """The transfer stopped midway: what arrived is kept in the .part file."""


def sha256_hex(text: str) -> str:
    """argparse type of ``--sha256``: 64 hexadecimal digits."""
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise argparse.ArgumentTypeError(f"must be 64 hexadecimal digits, got {text!r}")
    return text.lower()


def get_args_parser():
    p = utils.ArgumentParser(
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
    p.add_argument("--timeout", type=utils.positive_float, default=30.0, help="seconds to wait for a server to answer")
    return p


# ---------------------------------------------------------------------------------------------
# Download


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return str(e.reason)
    return str(e) or type(e).__name__


def _open(url: str, start: int, timeout: float):
    """The server's answer for the bytes from ``start`` on; Unavailable if there is none."""
    headers = {"User-Agent": "blockdrop-download"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # nothing after `start`: the partial file may be complete already
            total = re.fullmatch(r"bytes \*/(\d+)", e.headers.get("Content-Range", "") or "")
            if total and int(total.group(1)) == start:
                return None
        raise Unavailable(_reason(e)) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise Unavailable(_reason(e)) from None


def fetch(url: str, part: Path, timeout: float) -> None:
    """Append the rest of ``url`` to ``part`` (all of it if the server cannot resume)."""
    start = part.stat().st_size if part.exists() else 0
    response = _open(url, start, timeout)
    if response is None:
        return
    with response:
        if start and getattr(response, "status", None) != 206:
            start = 0  # the server sends the whole file: start over
        length = response.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        try:
            first = response.read(CHUNK)
        except OSError as e:
            raise Unavailable(_reason(e)) from None
        if start == 0 and not first.startswith(GZIP_MAGIC):
            kind = response.headers.get("Content-Type") or "unknown type"
            raise Unavailable(f"it answered with something that is not a gzip file ({kind})")
        try:
            part.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create {part.parent} ({e.strerror})") from None
        with (
            open(part, "ab" if start else "wb") as f,
            tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=part.name.removesuffix(".part"),
                dynamic_ncols=True,
                disable=None,  # on a terminal only: logs get the summary lines
            ) as bar,
        ):
            chunk = first
            try:
                while chunk:
                    f.write(chunk)
                    bar.update(len(chunk))
                    chunk = response.read(CHUNK)
            except OSError as e:
                raise Interrupted(_reason(e)) from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise Interrupted(f"got {size} of {total} bytes")


def download(urls: list[str], archive: Path, timeout: float) -> str:
    """Fetch the archive from the first URL that has it; returns that URL."""
    part = archive.with_name(archive.name + ".part")
    failures = []
    for url in urls:
        for attempt in range(ATTEMPTS):
            try:
                fetch(url, part, timeout)
            except Unavailable as e:
                if attempt == 0:
                    failures.append(f"{url}: {e}")
                    break
                raise UserError(f"{url} stopped answering ({e}); {_kept(part)}") from None
            except Interrupted as e:
                if attempt + 1 < ATTEMPTS:
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
    size = part.stat().st_size if part.exists() else 0
    return f"{size} bytes are kept in {part}: run the same command again to resume"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Unpacking


def _parts(name: str) -> list[str]:
    if name.startswith("/") or re.match(r"[A-Za-z]:", name):
        raise UserError(f"refused: member {name!r} has an absolute path; nothing was unpacked")
    return [p for p in PurePosixPath(name).parts if p != "."]


def _relative_names(members: list[tarfile.TarInfo]) -> tuple[list[str], bool]:
    """Member names relative to --dest, and whether a top-level ``cv/`` holding everything was dropped."""
    names = [_parts(m.name) for m in members]
    strip = bool(names) and all(parts and parts[0] == "cv" for parts in names)
    return ["/".join(parts[int(strip) :]) for parts in names], strip


def _same_file(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> bool:
    """Whether ``dest`` already holds this member, unchanged."""
    target = dest / member.name
    if member.islnk():  # a hard link: the same content as the member it names
        linked = dest / member.linkname
        return target.is_file() and linked.is_file() and filecmp.cmp(target, linked, shallow=False)
    if member.isdir():
        return target.is_dir() and not target.is_symlink()
    if member.issym():
        return target.is_symlink() and os.readlink(target) == member.linkname
    if not target.is_file() or target.is_symlink() or target.stat().st_size != member.size:
        return False
    digest = hashlib.sha256()
    with tar.extractfile(member) as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest() == sha256_of(target)


def plan_unpack(tar: tarfile.TarFile, dest: Path) -> tuple[list[tarfile.TarInfo], list[tarfile.TarInfo], list[Path]]:
    """Check every member before anything is written.

    Returns (members to write, renamed relative to ``dest``; members already there and identical;
    existing files that differ). A member that would land outside ``dest`` is a UserError.
    """
    members = tar.getmembers()
    names, strip = _relative_names(members)
    todo, same, conflicts = [], [], []
    for member, name in zip(members, names, strict=True):
        if not name:
            continue  # the top-level cv/ folder itself
        changes = {"name": name}
        if member.islnk():  # a hard link names another member: rename its target alike
            if member.linkname.startswith("/"):
                raise UserError(f"refused: member {member.name!r} links to an absolute path; nothing was unpacked")
            changes["linkname"] = "/".join(_parts(member.linkname)[int(strip) :])
        try:
            checked = tarfile.data_filter(member.replace(**changes, deep=False), str(dest))
        except tarfile.FilterError as e:
            raise UserError(f"refused: member {member.name!r}: {e}; nothing was unpacked") from None
        if checked is None:
            continue
        target = dest / checked.name
        if not os.path.lexists(target):
            todo.append(checked)
        elif _same_file(tar, checked, dest):
            same.append(checked)
        elif checked.isdir() and target.is_dir():
            same.append(checked)
        else:
            todo.append(checked)
            conflicts.append(target)
    return todo, same, conflicts


def unpack(archive: Path, dest: Path, overwrite: bool) -> tuple[int, int]:
    """Unpack ``archive`` into ``dest``; returns (entries written, entries already there)."""
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {dest} ({e.strerror})") from None
    try:
        tar = tarfile.open(archive, "r:*")
        with tar:
            todo, same, conflicts = plan_unpack(tar, dest)
            if conflicts and not overwrite:
                raise UserError(
                    f"{len(conflicts)} file(s) in {dest} differ from the archive's (first: {conflicts[0]}); "
                    f"nothing was unpacked: move them away or pass --overwrite"
                )
            # Unpack next to the destination, then move each entry into place: a file in `dest`
            # is either the old one or the complete new one, never half written.
            with tempfile.TemporaryDirectory(dir=dest, prefix=".unpack-") as tmp:
                tar.extractall(tmp, members=todo, filter="data")
                for member in todo:
                    target = dest / member.name
                    if member.isdir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if target.is_dir() and not target.is_symlink():
                        shutil.rmtree(target)
                    os.replace(Path(tmp) / member.name, target)
    except (tarfile.TarError, EOFError, zlib.error) as e:
        raise UserError(
            f"{archive} is not a complete tar.gz archive ({_reason(e)}); delete it to download it again"
        ) from None
    except OSError as e:
        raise UserError(f"cannot unpack into {dest} ({e.strerror or e})") from None
    return sum(not m.isdir() for m in todo), sum(not m.isdir() for m in same)


# ---------------------------------------------------------------------------------------------


UserError = utils.UserError


def main(args) -> None:
    if not hasattr(tarfile, "data_filter"):
        raise UserError("unpacking safely needs tarfile's extraction filters: Python 3.10.12+, 3.11.4+ or 3.12+")
    archive = Path(args.archive)
    dest = Path(args.dest)
    if archive.is_file():
        print(f"using {archive} (already here; delete it to download again)", flush=True)
    elif archive.exists():
        raise UserError(f"--archive {archive} exists and is not a file")
    else:
        part = archive.with_name(archive.name + ".part")
        try:
            url = download(args.url or list(URLS), archive, args.timeout)
        except KeyboardInterrupt:
            print(f"\ninterrupted; {_kept(part)}", file=sys.stderr)
            sys.exit(130)
        print(f"downloaded {archive} from {url}", flush=True)
    digest = sha256_of(archive)
    print(f"sha256 {digest}  {archive}", flush=True)
    if args.sha256 and digest != args.sha256:
        raise UserError(
            f"{archive} has SHA-256 {digest}, not the expected {args.sha256}: nothing was unpacked "
            f"(delete it to download again)"
        )
    written, kept = unpack(archive, dest, args.overwrite)
    print(f"unpacked {written} file(s) into {dest}" + (f"; {kept} already there and identical" if kept else ""))
    found = [
        model for model, name in utils.RELEASED_BASE_FILES.items() if (dest / "pretrained" / model / name).is_file()
    ]
    if found:
        print(f"released base models in {dest / 'pretrained'}: {', '.join(found)}")


if __name__ == "__main__":
    utils.run(main, get_args_parser())
