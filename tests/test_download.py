"""download_checkpoints.py against archives served from files and from an HTTP server on 127.0.0.1."""

import hashlib
import http.server
import io
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
    """Serves ``files``; the answer for a path in ``cut`` stops halfway: "length" with a
    Content-Length, "chunked" in chunked transfer encoding, "close" with neither."""

    files: dict[str, tuple[bytes, str]] = {}
    cut: dict[str, str] = {}
    requests: list[str] = []

    def do_GET(self):
        self.requests.append(self.path)
        if self.path not in self.files:
            self.send_error(404)
            return
        body, kind = self.files[self.path]
        self.send_response(200)
        self.send_header("Content-Type", kind)
        cut = self.cut.get(self.path)
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
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/blockdrop-checkpoints.tar.gz"


def tarball(*members) -> bytes:
    """A tar.gz of folder names, (name, bytes) files, (name, bytes, pax headers), (name, '->', target)
    symlinks, (name, '=>', target) hard links and (name, 'dev') character devices."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m if isinstance(m, str) else m[0])
            if isinstance(m, str):
                info.type = tarfile.DIRTYPE
            elif m[1] in ("->", "=>"):
                info.type, info.linkname = (tarfile.SYMTYPE if m[1] == "->" else tarfile.LNKTYPE), m[2]
            elif m[1] == "dev":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            else:
                info.size, info.pax_headers = len(m[1]), (m[2] if len(m) > 2 else {})
            tar.addfile(info, io.BytesIO(m[1]) if info.isfile() else None)
    return buf.getvalue()


def released_tarball(folder: Path) -> tuple[bytes, torch.nn.Module]:
    """A small tarball laid out like the authors': a top-level cv/ with a base model and a BlockDrop run."""
    rnet, agent = utils.build_model("R32_C10")
    save_py2_torch03({"state_dict": torch03_state_dict(rnet.state_dict(), "module.", layer_names=True)}, folder / "b")
    ckpt = {"agent": torch03_state_dict(agent.state_dict()), "epoch": 5300, "reward": 0.2, "acc": 0.7}
    save_py2_torch03(ckpt, folder / "c")
    data = tarball(
        "cv",
        "cv/pretrained",
        ("cv/pretrained/R32_C10/pk_E_164_A_0.923.t7", (folder / "b").read_bytes()),
        ("cv/cl_learning/R32_C10/ckpt_E_5300_A_0.700_R_2.00E-01_S_9.00_#_9.t7", (folder / "c").read_bytes()),
    )
    return data, rnet


def download(*args, cwd: Path):
    command = [sys.executable, str(ROOT / "download_checkpoints.py"), *map(str, args)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def run_main(capsys, *args) -> tuple[int, str, str]:
    """download_checkpoints.py in this process (faster than a subprocess): exit code, stdout, stderr."""
    try:
        utils.run(dl.main, dl.get_args_parser(), [str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


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
    # The top-level cv/ maps onto --dest; no temporary file or folder is left.
    assert sorted(p.name for p in (tmp_path / "cv").iterdir()) == [
        "blockdrop-checkpoints.tar.gz",
        "cl_learning",
        "pretrained",
    ]
    with pytest.MonkeyPatch.context() as mp:  # what was unpacked is what get_model and load_checkpoint read
        mp.chdir(tmp_path)
        loaded, agent = utils.get_model("R32_C10")
        ckpt = utils.load_checkpoint(loaded, agent, next(Path("cv/cl_learning/R32_C10").iterdir()))
    assert torch.equal(loaded.fc.weight, rnet.fc.weight) and ckpt["epoch"] == 5300
    Server.requests.clear()  # again: the archive is not downloaded again, nothing is rewritten
    again = download(f"--url={server}/ck.tar.gz", cwd=tmp_path)
    assert again.returncode == 0 and Server.requests == []
    assert "unpacked 0 file(s) into cv; 2 already there and identical" in again.stdout


@pytest.mark.parametrize("cut", ["length", "chunked", "close"])
def test_a_transfer_that_stops_midway_keeps_nothing(cut, server, tmp_path):
    data, _ = released_tarball(tmp_path)
    Server.files["/ck.tar.gz"] = (data, "application/gzip")
    Server.cut["/ck.tar.gz"] = cut
    archive = tmp_path / "dl/ck.tar.gz"
    with pytest.raises(utils.UserError, match=r"could not download ck.tar.gz: http://.*/ck.tar.gz: .*--archive FILE"):
        dl.download([f"{server}/ck.tar.gz"], archive, timeout=10)
    assert not archive.parent.exists()  # neither the archive nor a temporary file, nor the folder
    del Server.cut["/ck.tar.gz"]
    assert dl.download([f"{server}/ck.tar.gz"], archive, timeout=10) == f"{server}/ck.tar.gz"
    assert archive.read_bytes() == data and list(archive.parent.iterdir()) == [archive]


def test_a_server_file_that_is_not_a_whole_archive_is_refused(server, tmp_path):
    data, _ = released_tarball(tmp_path)
    Server.files["/ck.tar.gz"] = (data[: len(data) // 2], "application/gzip")
    Server.files["/page.html"] = (b"<html>moved</html>", "text/html")
    urls = [f"{server}/ck.tar.gz", f"{server}/page.html"]
    with pytest.raises(
        utils.UserError, match=r"ck.tar.gz: the gzip stream ends early; .*page.html: not an intact gzip"
    ):
        dl.download(urls, tmp_path / "ck.tar.gz", timeout=10)
    assert list(tmp_path.glob("ck.tar.gz*")) == []


def test_a_wrong_digest_unpacks_nothing(tmp_path):
    data, _ = released_tarball(tmp_path)
    (tmp_path / "served.tar.gz").write_bytes(data)
    url = (tmp_path / "served.tar.gz").as_uri()
    result = download(f"--url={url}", "--sha256", "0" * 64, "--dest", "out", cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
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


HOSTILE = {
    "dotdot": [("cv/../../escaped.txt", b"x")],
    "absolute": [("/tmp/escaped.txt", b"x")],
    "symlink-absolute": [("cv/etc", "->", "/etc")],
    "symlink-up": [("cv/up", "->", "../../..")],
    "hardlink-absolute": [("cv/hard", "=>", "/etc/passwd")],
    "empty-link": [("cv/f", b"f"), ("cv/l", "->", "")],
    "overlong-link": [("cv/f", b"f"), ("cv/l", "->", "./" * 2100 + "f")],
    "nul": [("cv/x", b"", {"path": "cv/a\x00b"})],
    "device": [("cv/null", "dev")],
    "link-chain-out": [("cv/y", "->", "w/w/../.."), ("cv/w", "->", ".")],
    "top-level-cv-is-a-link": [("cv", "->", "/"), ("cv/f", b"f")],
    # the archive's own link, then a name through it that replaces an existing folder or leads out
    "through-own-link": [("cv/finetuned/zz.txt", b"z"), ("cv/s", "->", "finetuned"), ("cv/s/myrun", b"f")],
    "through-own-link-out": [("cv/x/zz.txt", b"z"), ("cv/p", "->", "x"), ("cv/p/data/victim", b"f")],
    "through-dest-link": [("cv/x/data/victim/f", b"f")],
    "folder-through-dest-link": ["cv/x/data/made_outside"],
    "file-then-folder": [("cv/a", b"a"), ("cv/a/b", b"b")],
    "file-over-folder": [("cv/finetuned", b"a file where runs are")],
    "link-over-folder": [("cv/finetuned", "->", "x")],
    "bad-time-stamp": [("cv/f", b"f", {"mtime": "1e30"})],
    "duplicate": [("cv/a.t7", b"old"), ("cv/b.t7", b"b"), ("cv/a.t7", b"new")],
    "file-under-then-link": [("cv/d/f", b"f"), ("cv/d", "->", "x")],
    "folder-then-link": ["cv/d", ("cv/d", "->", "f")],
    "top-level-cv-links-to-itself": [("cv", "->", "."), ("cv/f", b"f")],
    # a link of the archive through a link of dest, or through another link of the archive
    "link-through-dest-link": [("cv/l", "->", "x/data/victim")],
    "link-through-own-link": [("cv/m", "->", "x"), ("cv/l", "->", "m/data")],
}


def test_hostile_archives_change_nothing(tmp_path, monkeypatch, capsys):
    dest, outside = tmp_path / "cv", tmp_path / "outside"
    (dest / "finetuned/myrun").mkdir(parents=True)
    (dest / "finetuned/myrun/ckpt.t7").write_bytes(b"mine")
    (outside / "victim").mkdir(parents=True)
    (dest / "x").mkdir()
    (dest / "x/data").symlink_to(outside)  # the user's own link out of dest
    before = files_under(tmp_path)
    for case, members in HOSTILE.items():
        archive = tmp_path / f"{case}.tar.gz"
        archive.write_bytes(tarball(("cv/pretrained/good.t7", b"fine"), *members))  # a harmless member first
        for overwrite in (False, True):
            with pytest.raises(utils.UserError, match=r"nothing was unpacked$"):
                dl.unpack(archive, dest, overwrite=overwrite)
        archive.unlink()
        assert files_under(tmp_path) == before, case
        assert sorted(p.name for p in dest.iterdir()) == ["finetuned", "x"], case
        assert sorted(p.name for p in outside.iterdir()) == ["victim"], case
    # From the command line: one line, exit code 2, not even an empty --dest.
    (tmp_path / "evil.tar.gz").write_bytes(tarball(*HOSTILE["symlink-up"]))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, "--archive", "evil.tar.gz", "--dest", "a/b/cv")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "error: refused: member 'cv/up' has an absolute or '..' link target; nothing was unpacked" in err
    assert not Path("a").exists()


def test_existing_files_are_not_overwritten_without_overwrite(tmp_path, monkeypatch, capsys):
    data, _ = released_tarball(tmp_path)
    (tmp_path / "ck.tar.gz").write_bytes(data)
    mine = tmp_path / "cv/pretrained/R32_C10/pk_E_164_A_0.923.t7"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"my own model")
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, "--archive", "ck.tar.gz")
    assert code == 2
    assert "1 file(s) in cv differ from the archive's (first: cv/pretrained/R32_C10/pk_E_164_A_0.923.t7)" in err
    assert mine.read_bytes() == b"my own model" and not (tmp_path / "cv/cl_learning").exists()
    code, out, err = run_main(capsys, "--archive", "ck.tar.gz", "--overwrite")
    assert code == 0 and "unpacked 2 file(s) into cv" in out
    assert utils.load_file(mine)["state_dict"]  # the archive's file, readable


def test_links_hard_links_and_a_dot_top_folder(tmp_path):
    archive = tmp_path / "l.tar.gz"
    runs = [
        ("./cv/runs/a.t7", b"data"),
        ("./cv/runs/b.t7", "=>", "./cv/runs/a.t7"),
        ("./cv/runs/latest.t7", "->", "a.t7"),
    ]
    archive.write_bytes(tarball("./", "./cv", *runs))
    dest = tmp_path / "out"
    assert dl.unpack(archive, dest, overwrite=False) == (3, 0)
    runs = dest / "runs"  # ./cv/ maps onto dest
    assert [(p.name, p.is_symlink(), p.read_bytes()) for p in sorted(runs.iterdir())] == [
        ("a.t7", False, b"data"),
        ("b.t7", False, b"data"),
        ("latest.t7", True, b"data"),
    ]
    (runs / "b.t7").unlink()
    assert dl.unpack(archive, dest, overwrite=False) == (1, 2)  # the hard link's file is restored
    assert sorted(p.name for p in dest.iterdir()) == ["runs"]


def test_a_file_that_is_not_a_whole_archive_is_one_line(tmp_path, monkeypatch, capsys):
    data, _ = released_tarball(tmp_path)
    damaged = bytearray(data)
    damaged[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # tarfile alone would stop quietly there
    monkeypatch.chdir(tmp_path)
    for content in (b"<html>Moved</html>", data[: len(data) // 2], bytes(damaged)):
        Path("ck.tar.gz").write_bytes(content)
        code, _, err = run_main(capsys, "--archive", "ck.tar.gz")
        assert code == 2 and len(err.strip().splitlines()) == 1
        assert "ck.tar.gz is not a complete tar.gz archive" in err and "delete it and download it again" in err
        assert not Path("cv").exists()
