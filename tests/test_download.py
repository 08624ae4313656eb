"""download_checkpoints.py against archives served from files and from an HTTP server on 127.0.0.1."""

import hashlib
import http.server
import io
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from legacy import save_py2_torch03, torch03_state_dict

import download_checkpoints as dl
import utils

ROOT = Path(__file__).resolve().parent.parent


class Server(http.server.BaseHTTPRequestHandler):
    """Serves ``files`` with HTTP Range support.

    The first answer for a path in ``cut`` stops halfway: "length" with a Content-Length, "chunked"
    in chunked transfer encoding, "close" with neither (the end of the connection ends the body).
    """

    files: dict[str, tuple[bytes, str]] = {}
    cut: dict[str, str] = {}
    requests: list[tuple[str, str | None]] = []

    def do_GET(self):
        self.requests.append((self.path, self.headers.get("Range")))
        if self.path not in self.files:
            self.send_error(404)
            return
        data, kind = self.files[self.path]
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", kind)
        body = data[start:]
        cut = self.cut.pop(self.path, None)
        if cut == "chunked":
            self.send_header("Transfer-Encoding", "chunked")
        elif cut != "close":
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if cut:
            self.close_connection = True
            body = body[: len(body) // 2]
        if cut == "chunked":
            self.wfile.write(f"{len(body):x}\r\n".encode() + body + b"\r\n")  # and no last chunk
        else:
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    Server.files, Server.cut, Server.requests = {}, {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/blockdrop-checkpoints.tar.gz"


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def released_tarball(folder: Path) -> tuple[bytes, torch.nn.Module]:
    """A small tarball laid out like the authors': a top-level cv/ with a base model and a BlockDrop run."""
    rnet, agent = utils.build_model("R32_C10")
    base = folder / "base.t7"
    save_py2_torch03({"state_dict": torch03_state_dict(rnet.state_dict(), "module.", layer_names=True)}, base)
    ckpt = folder / "ckpt.t7"
    save_py2_torch03({"agent": torch03_state_dict(agent.state_dict()), "epoch": 5300, "reward": 0.2, "acc": 0.7}, ckpt)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in ("cv", "cv/pretrained", "cv/pretrained/R32_C10"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        add_file(tar, "cv/pretrained/R32_C10/pk_E_164_A_0.923.t7", base.read_bytes())
        add_file(tar, "cv/cl_learning/R32_C10/ckpt_E_5300_A_0.700_R_2.00E-01_S_9.00_#_9.t7", ckpt.read_bytes())
    return buf.getvalue(), rnet


def download(*args, cwd: Path):
    return subprocess.run(
        [sys.executable, str(ROOT / "download_checkpoints.py"), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def run_main(capsys, *args) -> tuple[int, str, str]:
    """download_checkpoints.py in this process (faster than a subprocess): exit code, stdout, stderr."""
    try:
        utils.run(dl.main, dl.get_args_parser(), [str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_downloads_from_the_first_url_that_serves_the_archive_verifies_and_unpacks(server, tmp_path):
    data, rnet = released_tarball(tmp_path)
    digest = hashlib.sha256(data).hexdigest()
    Server.files["/page.html"] = (b"<html>moved</html>", "text/html")
    Server.files["/ck.tar.gz"] = (data, "application/gzip")
    urls = [closed_port_url(), f"{server}/gone.tar.gz", f"{server}/page.html", f"{server}/ck.tar.gz"]
    result = download(*(f"--url={u}" for u in urls), "--sha256", digest.upper(), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"sha256 {digest}  cv/blockdrop-checkpoints.tar.gz" in result.stdout
    assert "unpacked 2 file(s) into cv" in result.stdout
    assert "base models in cv/pretrained: R32_C10" in result.stdout
    assert (tmp_path / "cv/blockdrop-checkpoints.tar.gz").read_bytes() == data
    assert not (tmp_path / "cv/blockdrop-checkpoints.tar.gz.part").exists()
    assert sorted(p.name for p in (tmp_path / "cv").iterdir()) == [
        "blockdrop-checkpoints.tar.gz",
        "cl_learning",
        "pretrained",
    ]  # the top-level cv/ maps onto --dest, and no temporary folder is left
    # What was unpacked is what get_model and load_checkpoint read.
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        loaded, agent = utils.get_model("R32_C10")
        ckpt = utils.load_checkpoint(loaded, agent, next(Path("cv/cl_learning/R32_C10").iterdir()))
    assert torch.equal(loaded.fc.weight, rnet.fc.weight) and ckpt["epoch"] == 5300
    # Run again: the archive is not downloaded again, nothing is rewritten.
    Server.requests.clear()
    again = download(f"--url={server}/ck.tar.gz", cwd=tmp_path)
    assert again.returncode == 0 and Server.requests == []
    assert "unpacked 0 file(s) into cv; 2 already there and identical" in again.stdout


def test_a_partial_download_is_resumed(server, tmp_path):
    data, _ = released_tarball(tmp_path)
    Server.files["/ck.tar.gz"] = (data, "application/gzip")
    archive = tmp_path / "dl/ck.tar.gz"
    archive.parent.mkdir()
    archive.with_name("ck.tar.gz.part").write_bytes(data[:1000])  # an earlier run was stopped
    url = dl.download([f"{server}/ck.tar.gz"], archive, timeout=10)
    assert url == f"{server}/ck.tar.gz"
    assert Server.requests == [("/ck.tar.gz", "bytes=1000-")]
    assert archive.read_bytes() == data and not archive.with_name("ck.tar.gz.part").exists()
    # A complete .part (the move into place was interrupted) is recognised by the server's 416.
    archive.rename(archive.with_name("ck.tar.gz.part"))
    Server.requests.clear()
    dl.download([f"{server}/ck.tar.gz"], archive, timeout=10)
    assert archive.read_bytes() == data and Server.requests == [("/ck.tar.gz", f"bytes={len(data)}-")]


@pytest.mark.parametrize("cut", ["length", "chunked", "close"])
def test_a_transfer_that_stops_midway_is_resumed_in_the_same_run(cut, server, tmp_path):
    data, _ = released_tarball(tmp_path)
    Server.files["/ck.tar.gz"] = (data, "application/gzip")
    Server.cut["/ck.tar.gz"] = cut
    archive = tmp_path / "ck.tar.gz"
    dl.download([f"{server}/ck.tar.gz"], archive, timeout=10)
    assert archive.read_bytes() == data
    assert Server.requests == [("/ck.tar.gz", None), ("/ck.tar.gz", f"bytes={len(data) // 2}-")]


def test_a_partial_file_that_cannot_be_continued_is_started_over(server, tmp_path, capsys):
    data, _ = released_tarball(tmp_path)
    Server.files["/ck.tar.gz"] = (data, "application/gzip")
    archive = tmp_path / "ck.tar.gz"
    part = tmp_path / "ck.tar.gz.part"
    part.write_bytes(data + b"stale bytes from something else")  # longer than the server's file: 416
    dl.download([f"{server}/ck.tar.gz"], archive, timeout=10)
    assert archive.read_bytes() == data
    assert "starting over" in capsys.readouterr().err
    # Bytes from another file (another URL, or the file changed on the server): gzip's CRC fails.
    archive.unlink()
    part.write_bytes(data[:200] + bytes([data[200] ^ 0xFF]) + data[201:500])
    Server.requests.clear()
    dl.download([f"{server}/ck.tar.gz"], archive, timeout=10)
    assert archive.read_bytes() == data
    assert Server.requests == [("/ck.tar.gz", "bytes=500-"), ("/ck.tar.gz", None)]
    assert "corrupt" in capsys.readouterr().err


def test_a_wrong_digest_unpacks_nothing(tmp_path):
    data, _ = released_tarball(tmp_path)
    (tmp_path / "served.tar.gz").write_bytes(data)
    result = download(
        f"--url={(tmp_path / 'served.tar.gz').as_uri()}", "--sha256", "0" * 64, "--dest", "out", cwd=tmp_path
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"has SHA-256 {hashlib.sha256(data).hexdigest()}, not the expected {'0' * 64}" in result.stderr
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "cv/blockdrop-checkpoints.tar.gz").read_bytes() == data  # kept: the digest is printed


def test_no_network_is_one_line_and_exit_code_2(tmp_path):
    result = download(f"--url={closed_port_url()}", "--url", "https://blockdrop.invalid/ck.tar.gz", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not download blockdrop-checkpoints.tar.gz" in lines[0]
    assert "blockdrop.invalid" in lines[0] and "--archive FILE" in lines[0]
    assert list(tmp_path.iterdir()) == []  # not even an empty cv/


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tar: add_file(tar, "cv/../../escaped.txt", b"x"), "has '..' in its name"),
        (lambda tar: add_file(tar, "../escaped.txt", b"x"), "has '..' in its name"),
        (lambda tar: add_file(tar, "/tmp/escaped.txt", b"x"), "member '/tmp/escaped.txt' has an absolute name;"),
        (lambda tar: tar.addfile(link("cv/etc", "/etc")), "has an absolute link target ('/etc')"),
        (lambda tar: tar.addfile(link("cv/up", "../../..")), "has '..' in its link target"),
        (lambda tar: tar.addfile(link("cv/hard", "/etc/passwd", tarfile.LNKTYPE)), "has an absolute link target"),
        (lambda tar: tar.addfile(link("cv/hard", "cv/../../x", tarfile.LNKTYPE)), "has '..' in its link target"),
        (lambda tar: tar.addfile(device("cv/null")), "is unsafe: 'null' is a special file"),
        (lambda tar: nul_name(tar), "has a NUL byte"),
    ],
    ids=[
        "dotdot-under-cv",
        "dotdot",
        "absolute",
        "symlink-absolute",
        "symlink-up",
        "hardlink",
        "hardlink-up",
        "device",
        "nul",
    ],
)
def test_members_that_would_land_outside_dest_are_refused(make, message, tmp_path, monkeypatch, capsys):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        add_file(tar, "cv/pretrained/good.t7", b"fine")  # a harmless member first: not unpacked either
        make(tar)
    archive = tmp_path / "evil.tar.gz"
    archive.write_bytes(buf.getvalue())
    dest = tmp_path / "a/b/cv"
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, "--archive", archive, "--dest", dest)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "refused: member" in err and message in err and "nothing was unpacked" in err
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [archive]


def link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def nul_name(tar: tarfile.TarFile) -> None:
    info = tarfile.TarInfo("cv/x")
    info.pax_headers = {"path": "cv/a\x00b"}
    tar.addfile(info, io.BytesIO())


def device(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info


def test_existing_files_are_not_overwritten_without_overwrite(tmp_path, monkeypatch, capsys):
    data, _ = released_tarball(tmp_path)
    archive = tmp_path / "ck.tar.gz"
    archive.write_bytes(data)
    mine = tmp_path / "cv/pretrained/R32_C10/pk_E_164_A_0.923.t7"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my own model")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, "--archive", archive)
    assert code == 2
    assert "1 file(s) in cv differ from the archive's (first: cv/pretrained/R32_C10/pk_E_164_A_0.923.t7)" in err
    assert mine.read_bytes() == b"my own model" and not (tmp_path / "cv/cl_learning").exists()
    code, out, err = run_main(capsys, "--archive", archive, "--overwrite")
    assert code == 0, err
    assert "unpacked 2 file(s) into cv" in out
    assert utils.load_file(mine)["state_dict"]  # the archive's file, readable


def test_links_inside_the_archive_are_kept(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        add_file(tar, "cv/runs/a.t7", b"data")
        tar.addfile(link("cv/runs/b.t7", "cv/runs/a.t7", tarfile.LNKTYPE))
        tar.addfile(link("cv/runs/latest.t7", "a.t7"))
    (tmp_path / "l.tar.gz").write_bytes(buf.getvalue())
    assert dl.unpack(tmp_path / "l.tar.gz", tmp_path / "out", overwrite=False) == (3, 0)
    runs = tmp_path / "out/runs"
    assert [(p.name, p.is_symlink(), p.read_bytes()) for p in sorted(runs.iterdir())] == [
        ("a.t7", False, b"data"),
        ("b.t7", False, b"data"),
        ("latest.t7", True, b"data"),
    ]
    assert os.listdir(tmp_path / "out") == ["runs"]
    assert dl.unpack(tmp_path / "l.tar.gz", tmp_path / "out", overwrite=False) == (0, 3)


def tarball(path: Path, *members) -> Path:
    """A tar.gz of (name, bytes), (name, '->', target) symlinks, (name, '=>', target) hard links, or folder names."""
    with tarfile.open(path, "w:gz") as tar:
        for m in members:
            if isinstance(m, str):
                info = tarfile.TarInfo(m)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif len(m) == 2:
                add_file(tar, *m)
            else:
                tar.addfile(link(m[0], m[2], tarfile.SYMTYPE if m[1] == "->" else tarfile.LNKTYPE))
    return path


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_names_through_a_link_of_the_archive_or_of_dest_are_refused(tmp_path):
    dest, outside = tmp_path / "cv", tmp_path / "outside"
    (dest / "finetuned/myrun").mkdir(parents=True)
    (dest / "finetuned/myrun/ckpt.t7").write_bytes(b"mine")
    outside.mkdir()
    (outside / "victim").mkdir()
    (dest / "x").mkdir()
    (dest / "x/data").symlink_to(outside)  # the user's own link out of dest
    before = files_under(tmp_path)
    cases = {
        # the archive's own link, then a name through it that replaces an existing folder
        "through-own-link": [("cv/finetuned/zz.txt", b"z"), ("cv/s", "->", "finetuned"), ("cv/s/myrun", b"f")],
        "through-own-link-out": [("cv/x/zz.txt", b"z"), ("cv/p", "->", "x"), ("cv/p/data/victim", b"f")],
        "through-dest-link": [("cv/x/data/victim/f", b"f")],
        "folder-through-dest-link": ["cv/x/data/made_outside"],
        "duplicate": [("cv/a.t7", b"old"), ("cv/b.t7", b"b"), ("cv/a.t7", b"new")],
        "file-then-folder": [("cv/a", b"a"), ("cv/a/b", b"b")],
        "file-under-then-link": [("cv/d/f", b"f"), ("cv/d", "->", "x")],
        "file-over-folder": [("cv/finetuned", b"a file where runs are")],
        # '..' spellings: the same name twice, a link made out of links that do not exist yet
        "dotdot-replaces": ["cv/q", ("cv/q/../finetuned/myrun/ckpt.t7", b"evil")],
        "link-chain-out": [("cv/y", "->", "w/w/../.."), ("cv/w", "->", ".")],
        "dotdot-through-later-link": [
            "cv/q",
            "cv/a/w",
            ("cv/w", "->", "a"),
            ("cv/y", "->", "w/w/../.."),
            "cv/q/../y/victim/made",
            ("cv/q/../w", "->", "."),
        ],
        "top-level-cv-is-a-link": [("cv", "->", "/"), ("cv/f", b"f")],
        # links that os.symlink cannot make: tarfile would copy their target instead, unfiltered
        "overlong-link": [("cv/f", b"f"), ("cv/l", "->", "./" * 2100 + "f")],
        "empty-link": [("cv/f", b"f"), ("cv/l", "->", "")],
        "folder-then-link": ["cv/d", ("cv/d", "->", "f")],
    }
    for case, members in cases.items():
        archive = tarball(tmp_path / f"{case}.tar.gz", *members)
        for overwrite in (False, True):
            with pytest.raises(utils.UserError, match=r"^refused: member .*; nothing was unpacked$"):
                dl.unpack(archive, dest, overwrite=overwrite)
        archive.unlink()
        assert files_under(tmp_path) == before, case
        assert sorted(p.name for p in dest.iterdir()) == ["finetuned", "x"], case
        assert sorted(p.name for p in outside.iterdir()) == ["victim"], case


def test_a_bad_time_stamp_is_refused(tmp_path):
    with tarfile.open(tmp_path / "t.tar.gz", "w:gz", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("cv/f")
        info.pax_headers = {"mtime": "1e30"}
        tar.addfile(info, io.BytesIO())
    with pytest.raises(utils.UserError, match="refused: member 'cv/f' has an invalid time stamp"):
        dl.unpack(tmp_path / "t.tar.gz", tmp_path / "out", overwrite=False)
    assert files_under(tmp_path / "out") == {}


def test_hard_links_and_a_dot_top_folder(tmp_path):
    archive = tarball(
        tmp_path / "a.tar.gz", "./", "./cv", ("./cv/runs/a.t7", b"data"), ("./cv/runs/b.t7", "=>", "./cv/runs/a.t7")
    )
    dest = tmp_path / "out"
    assert dl.unpack(archive, dest, overwrite=False) == (2, 0)
    assert files_under(dest) == {"runs/a.t7": b"data", "runs/b.t7": b"data"}  # ./cv/ maps onto dest
    (dest / "runs/b.t7").unlink()
    assert dl.unpack(archive, dest, overwrite=False) == (1, 1)  # the link's file is restored
    assert files_under(dest) == {"runs/a.t7": b"data", "runs/b.t7": b"data"}


def test_a_server_file_that_is_itself_truncated_stops_with_one_line(server, tmp_path):
    data, _ = released_tarball(tmp_path)
    Server.files["/ck.tar.gz"] = (data[: len(data) // 2], "application/gzip")
    with pytest.raises(utils.UserError, match="ends early although the server has no more of it, even after starting"):
        dl.download([f"{server}/ck.tar.gz"], tmp_path / "ck.tar.gz", timeout=10)
    (tmp_path / "x.tar.gz.part").mkdir()
    with pytest.raises(utils.UserError, match=r"cannot write .*x.tar.gz.part"):
        dl.download([f"{server}/ck.tar.gz"], tmp_path / "x.tar.gz", timeout=10)


def test_a_file_that_is_not_an_archive_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "page.tar.gz").write_bytes(b"<html>Moved</html>")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, "--archive", "page.tar.gz")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "page.tar.gz is not a tar.gz archive" in err


def test_a_truncated_archive_is_a_clear_error(tmp_path, monkeypatch, capsys):
    data, _ = released_tarball(tmp_path)
    (tmp_path / "ck.tar.gz").write_bytes(data[: len(data) // 2])
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, "--archive", "ck.tar.gz")
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    assert "ck.tar.gz is incomplete or corrupt" in err
    # Damage in the middle: tarfile alone would unpack the first file and stop quietly.
    damaged = bytearray(data)
    damaged[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    (tmp_path / "ck.tar.gz").write_bytes(bytes(damaged))
    code, _, err = run_main(capsys, "--archive", "ck.tar.gz")
    assert code == 2 and "ck.tar.gz is incomplete or corrupt" in err
    assert not any(p.is_file() for p in (tmp_path / "cv").rglob("*"))
