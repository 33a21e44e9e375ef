"""download_broden / `dissect data broden` against a local HTTP server (no internet).

The server (in this file) serves generated zips, answers Range requests with 206 and a
Content-Range, and can be told to drop the connection after N bytes, to ignore Range, or to
answer a Range request with the wrong range.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import logging
import shutil
import socket
import stat
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from dissect import DataError
from dissect.cli import main
from dissect.datasets import Broden, SyntheticConcepts, write_broden
from dissect.datasets.download import download_broden

NAME = "broden1_224"


@dataclass
class State:
    files: dict[str, bytes] = field(default_factory=dict)
    drop_after: int | None = None  # the next response stops after this many body bytes
    stall: float = 0.0  # ... and then waits this long before closing the connection
    ignore_range: bool = False
    wrong_range: bool = False  # answer a Range request with a range starting at 0
    requests: list[dict] = field(default_factory=list)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:
        state: State = self.server.state  # type: ignore[attr-defined]
        state.requests.append({"path": self.path, "range": self.headers.get("Range")})
        data = state.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start, status = 0, 200
        wanted = self.headers.get("Range")
        if wanted and not state.ignore_range:
            start = int(wanted.removeprefix("bytes=").rstrip("-"))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if state.wrong_range:
                start = 0
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if state.drop_after is not None:
            self.wfile.write(body[: state.drop_after])
            state.drop_after = None
            self.wfile.flush()
            time.sleep(state.stall)
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)


@dataclass
class Server:
    state: State
    base: str

    def url(self, path: str = f"/{NAME}.zip") -> str:
        return self.base + path


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.state = State()  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02},
                              daemon=True)
    thread.start()
    try:
        yield Server(httpd.state, f"http://127.0.0.1:{httpd.server_address[1]}")  # type: ignore
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def broden(tmp_path_factory) -> Path:
    return write_broden(SyntheticConcepts(5, size=32, seed=3),
                        tmp_path_factory.mktemp("src") / NAME)


def zip_folder(folder: Path, top: str = NAME, extra: dict[str, bytes] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(folder.rglob("*")):
            arcname = f"{top}/{path.relative_to(folder).as_posix()}" if top else \
                path.relative_to(folder).as_posix()
            if path.is_dir():
                z.writestr(arcname + "/", b"")
            else:
                z.write(path, arcname)
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def good_zip(broden: Path) -> bytes:
    return zip_folder(broden)


def leftovers(dest: Path) -> list[str]:
    """What a failed run must not leave: temporary folders, the zip, the target."""
    return sorted(p.name for p in dest.iterdir() if p.name != f".{NAME}.zip.partial") \
        if dest.exists() else []


def assert_same_broden(a: Path, b: Path) -> None:
    x, y = Broden(a), Broden(b)
    assert x.concepts == y.concepts and len(x) == len(y)
    for i in range(len(x)):
        for key in ("image", "pixel_labels", "image_labels", "annotated"):
            assert torch.equal(x[i][key], y[i][key]), (i, key)


def test_download_and_unpack(server, good_zip, broden, tmp_path, caplog) -> None:
    server.state.files[f"/{NAME}.zip"] = good_zip
    with caplog.at_level(logging.INFO, logger="dissect"):
        root = download_broden(tmp_path / "data", url=server.url(), progress=False)
    assert root == tmp_path / "data" / NAME
    assert_same_broden(root, broden)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [NAME]  # zip deleted
    assert hashlib.sha256(good_zip).hexdigest() in caplog.text  # logged, to be pinned
    assert [r["range"] for r in server.state.requests] == [None]


def test_interrupted_transfer_resumes(server, good_zip, broden, tmp_path) -> None:
    server.state.files[f"/{NAME}.zip"] = good_zip
    server.state.drop_after = 5000
    with pytest.raises(DataError, match=rf"stopped after 5000 of {len(good_zip)} bytes.* "
                                        r"kept in .*partial: rerun to resume"):
        download_broden(tmp_path, url=server.url(), progress=False)
    partial = tmp_path / f".{NAME}.zip.partial"
    assert partial.read_bytes() == good_zip[:5000]
    assert leftovers(tmp_path) == []  # nothing unpacked
    root = download_broden(tmp_path, url=server.url(), progress=False, keep_zip=True)
    assert [r["range"] for r in server.state.requests] == [None, "bytes=5000-"]
    assert (tmp_path / f"{NAME}.zip").read_bytes() == good_zip  # byte-identical
    assert not partial.exists()
    assert_same_broden(root, broden)


def test_stalled_transfer_times_out_and_resumes(server, good_zip, tmp_path) -> None:
    server.state.files[f"/{NAME}.zip"] = good_zip
    server.state.drop_after, server.state.stall = 2000, 1.0
    with pytest.raises(DataError, match=r"stopped after 2000 of \d+ bytes \(TimeoutError"):
        download_broden(tmp_path, url=server.url(), progress=False, timeout=0.2)
    download_broden(tmp_path, url=server.url(), progress=False, keep_zip=True)
    assert server.state.requests[-1]["range"] == "bytes=2000-"
    assert (tmp_path / f"{NAME}.zip").read_bytes() == good_zip


def test_server_ignoring_range_restarts(server, good_zip, tmp_path, caplog) -> None:
    server.state.files[f"/{NAME}.zip"] = good_zip
    server.state.ignore_range = True
    (tmp_path / f".{NAME}.zip.partial").write_bytes(b"garbage" * 500)  # appended: corrupt
    with caplog.at_level(logging.INFO, logger="dissect"):
        download_broden(tmp_path, url=server.url(), progress=False, keep_zip=True)
    assert "ignored the request to resume at byte 3500" in caplog.text
    assert server.state.requests[0]["range"] == "bytes=3500-"
    assert (tmp_path / f"{NAME}.zip").read_bytes() == good_zip


def test_wrong_range_answer_restarts(server, good_zip, tmp_path) -> None:
    server.state.files[f"/{NAME}.zip"] = good_zip
    server.state.wrong_range = True
    (tmp_path / f".{NAME}.zip.partial").write_bytes(good_zip[:100])
    download_broden(tmp_path, url=server.url(), progress=False, keep_zip=True)
    assert [r["range"] for r in server.state.requests] == ["bytes=100-", None]
    assert (tmp_path / f"{NAME}.zip").read_bytes() == good_zip


def test_complete_partial_and_oversized_partial(server, good_zip, tmp_path) -> None:
    server.state.files[f"/{NAME}.zip"] = good_zip
    partial = tmp_path / f".{NAME}.zip.partial"
    partial.write_bytes(good_zip)  # 416 with the same total: complete, nothing more fetched
    download_broden(tmp_path / "", url=server.url(), progress=False)
    assert [r["range"] for r in server.state.requests] == [f"bytes={len(good_zip)}-"]
    shutil.rmtree(tmp_path / NAME)
    partial.write_bytes(good_zip + b"x" * 10)  # 416 with another total: from the start
    download_broden(tmp_path, url=server.url(), progress=False)
    assert server.state.requests[-1]["range"] is None
    assert leftovers(tmp_path) == [NAME]


def test_checksum(server, good_zip, tmp_path) -> None:
    server.state.files[f"/{NAME}.zip"] = good_zip
    right = hashlib.sha256(good_zip).hexdigest()
    wrong = "0" * 64
    with pytest.raises(DataError) as exc:
        download_broden(tmp_path, url=server.url(), sha256=wrong, progress=False)
    message = str(exc.value)
    assert server.url() in message and right in message and wrong in message
    assert "\n" not in message
    assert list(tmp_path.iterdir()) == []  # no partial, no zip, no temporary folder
    root = download_broden(tmp_path, url=server.url(), sha256=right.upper(), progress=False)
    assert (root / "index.csv").is_file()
    with pytest.raises(DataError, match="64 hex digits"):
        download_broden(tmp_path / "x", url=server.url(), sha256="abc")


def test_kept_zip_is_reused_and_checked(server, good_zip, tmp_path) -> None:
    server.state.files[f"/{NAME}.zip"] = good_zip
    download_broden(tmp_path, url=server.url(), progress=False, keep_zip=True)
    shutil.rmtree(tmp_path / NAME)
    download_broden(tmp_path, url=server.url(), progress=False, keep_zip=True)
    assert len(server.state.requests) == 1  # unpacked from the kept zip
    shutil.rmtree(tmp_path / NAME)
    with pytest.raises(DataError, match=rf"{NAME}.zip: the downloaded file has SHA-256"):
        download_broden(tmp_path, url=server.url(), sha256="1" * 64, progress=False)
    assert list(tmp_path.iterdir()) == []


def flipped(data: bytes) -> bytes:
    """``data`` with bytes in the middle of the first large member's compressed data changed."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        info = max(z.infolist(), key=lambda i: i.compress_size)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    middle = start + info.compress_size // 2
    return data[:middle] + bytes(b ^ 0x55 for b in data[middle:middle + 8]) + data[middle + 8:]


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_corrupt_zip_leaves_nothing(server, good_zip, tmp_path, damage) -> None:
    data = good_zip[: len(good_zip) // 2] if damage == "truncated" else flipped(good_zip)
    server.state.files[f"/{NAME}.zip"] = data
    with pytest.raises(DataError, match=rf"{NAME}.zip is truncated or corrupt .* rerun"):
        download_broden(tmp_path, url=server.url(), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_url_and_http_errors(server, tmp_path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{NAME}.zip"
    with pytest.raises(DataError, match=rf"cannot reach {url}: .*(refused|Errno)"):
        download_broden(tmp_path, url=url, progress=False, timeout=5)
    with pytest.raises(DataError, match=rf"could not download {server.url('/x.zip')}: HTTP 404"):
        download_broden(tmp_path, url=server.url("/x.zip"), progress=False)
    with pytest.raises(DataError, match="cannot download 'nowhere'"):
        download_broden(tmp_path, url="nowhere", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("member", ["../evil.txt", f"{NAME}/../../evil.txt", "/tmp/evil.txt",
                                    "symlink"])
def test_unsafe_members_are_refused(server, broden, tmp_path, member) -> None:
    extra = {member: b"evil"} if member != "symlink" else {}
    data = zip_folder(broden, extra=extra)
    if member == "symlink":
        buffer = io.BytesIO(data)
        with zipfile.ZipFile(buffer, "a") as z:
            info = zipfile.ZipInfo(f"{NAME}/images/link")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
        data = buffer.getvalue()
    server.state.files[f"/{NAME}.zip"] = data
    dest = tmp_path / "a" / "b"
    with pytest.raises(DataError, match="unsafe path|symbolic link"):
        download_broden(dest, url=server.url(), progress=False)
    assert not dest.exists()  # made by the call, removed when the call failed
    assert not list(tmp_path.rglob("evil.txt")) and not Path("/tmp/evil.txt").exists()


def test_not_a_broden_inside(server, broden, tmp_path) -> None:
    data = zip_folder(broden / "images")  # no index.csv
    server.state.files[f"/{NAME}.zip"] = data
    with pytest.raises(DataError, match="holds no Broden: no index.csv"):
        download_broden(tmp_path, url=server.url(), progress=False)
    assert list(tmp_path.iterdir()) == []
    server.state.files[f"/{NAME}.zip"] = zip_folder(broden, top="")  # index.csv at the top
    root = download_broden(tmp_path, url=server.url(), progress=False)
    assert_same_broden(root, broden)
    (tmp_path / "ref").mkdir()  # a folder made with this process's umask
    assert root.stat().st_mode & 0o777 == (tmp_path / "ref").stat().st_mode & 0o777


def test_present_target_needs_no_request(server, broden, tmp_path, caplog) -> None:
    shutil.copytree(broden, tmp_path / NAME)
    with caplog.at_level(logging.INFO, logger="dissect"):
        assert download_broden(tmp_path, url=server.url(), progress=False) == tmp_path / NAME
    assert server.state.requests == [] and "already unpacked" in caplog.text
    (tmp_path / "x" / "broden1_227").mkdir(parents=True)
    with pytest.raises(DataError, match="exists but holds no index.csv"):
        download_broden(tmp_path / "x", url=server.url(), resolution=227)
    with pytest.raises(DataError, match="224 or 227"):
        download_broden(tmp_path, resolution=384)
    assert server.state.requests == []


def test_leftover_unpacking_folder_is_removed(server, good_zip, tmp_path) -> None:
    server.state.files[f"/{NAME}.zip"] = good_zip
    (tmp_path / f".{NAME}.unpacking-old" / "x").mkdir(parents=True)
    download_broden(tmp_path, url=server.url(), progress=False)
    assert leftovers(tmp_path) == [NAME]


def test_cli(server, good_zip, tmp_path, capsys) -> None:
    server.state.files[f"/{NAME}.zip"] = good_zip
    dest = tmp_path / "d"
    server.state.drop_after = 1000
    assert main(["data", "broden", str(dest), "--url", server.url(), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dissect data") and err.count("\n") == 1
    assert "stopped after 1000" in err and "rerun to resume" in err
    assert main(["data", "broden", str(dest), "--url", server.url(), "--keep-zip",
                 "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out == f"{(dest / NAME).resolve()}\n"
    assert (dest / f"{NAME}.zip").read_bytes() == good_zip
    assert main(["data", "broden", str(dest), "--quiet"]) == 0  # present
    assert capsys.readouterr().out == out

    other = tmp_path / "e"
    assert main(["data", "broden", str(other), "--url", server.url(),
                 "--sha256", "ab" * 32]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("dissect data") and server.url() in err and "ab" * 32 in err
    assert not other.exists()
    for bad in (["--sha256", "xyz"], ["--resolution", "300"], ["--timeout", "0"]):
        with pytest.raises(SystemExit) as exc:
            main(["data", "broden", str(other), *bad])
        assert exc.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(line.startswith("dissect data broden: error: argument --")
                                   for line in lines)
    assert "64 hex digits" in lines[0] and "300" in lines[1] and "positive" in lines[2]


def test_file_url_and_folder_mode(good_zip, tmp_path) -> None:
    zip_path = tmp_path / "copy.zip"
    zip_path.write_bytes(good_zip)
    root = download_broden(tmp_path / "d", url=zip_path.as_uri(), progress=False)
    assert (root / "index.csv").is_file()
    (tmp_path / "ref").mkdir()  # a folder made with this process's umask
    assert root.stat().st_mode & 0o777 == (tmp_path / "ref").stat().st_mode & 0o777
