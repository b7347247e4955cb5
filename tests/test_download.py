"""nbzoo.data.download against a real HTTP server on 127.0.0.1 that honours Range requests."""

import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import pytest

from nbzoo.data import DownloadError, download, extract_zip

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class RangeHandler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    requests: list[dict] = []
    break_after: int | None = None  # close the connection after this many body bytes

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = self.files.get(self.path)
        RangeHandler.requests.append({"path": self.path, "range": self.headers.get("Range")})
        if body is None:
            self.send_error(404)
            return
        start = 0
        if rng := self.headers.get("Range"):
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        chunk = body[start:]
        if RangeHandler.break_after is not None:
            chunk = chunk[: RangeHandler.break_after]
        self.wfile.write(chunk)


@pytest.fixture
def server():
    RangeHandler.files = {"/data.bin": PAYLOAD}
    RangeHandler.requests = []
    RangeHandler.break_after = None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_downloads_and_verifies_the_hash(server, tmp_path):
    dest = download(f"{server}/data.bin", tmp_path / "d" / "data.bin", sha256=sha(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD
    assert not list(tmp_path.glob("d/*.part"))


def test_an_existing_valid_file_is_not_fetched_again(server, tmp_path):
    dest = tmp_path / "data.bin"
    dest.write_bytes(PAYLOAD)
    download(f"{server}/data.bin", dest, sha256=sha(PAYLOAD))
    assert RangeHandler.requests == []


def test_wrong_hash_leaves_nothing_behind(server, tmp_path):
    with pytest.raises(DownloadError, match="does not match"):
        download(f"{server}/data.bin", tmp_path / "data.bin", sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_a_partial_file_resumes_with_a_range_request(server, tmp_path):
    dest = tmp_path / "data.bin"
    Path(str(dest) + ".part").write_bytes(PAYLOAD[:300_000])
    download(f"{server}/data.bin", dest, sha256=sha(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD
    assert RangeHandler.requests[-1]["range"] == "bytes=300000-"


def test_a_broken_transfer_is_kept_and_resumed_next_time(server, tmp_path):
    dest = tmp_path / "data.bin"
    RangeHandler.break_after = 400_000
    with pytest.raises(DownloadError, match="incomplete|broke off"):
        download(f"{server}/data.bin", dest)
    assert not dest.exists()
    assert Path(str(dest) + ".part").stat().st_size == 400_000
    RangeHandler.break_after = None
    download(f"{server}/data.bin", dest, sha256=sha(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD


def test_http_errors_name_the_status(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{server}/missing.zip", tmp_path / "missing.zip")


def test_without_network_the_message_names_url_and_local_path(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "glue" / "SST-2.zip"
    with pytest.raises(DownloadError) as info:
        download(f"http://127.0.0.1:{port}/glue/data/SST-2.zip", dest, timeout=2)
    message = str(info.value)
    assert f"http://127.0.0.1:{port}/glue/data/SST-2.zip" in message
    assert str(dest.resolve()) in message


def test_offline_mode_fails_before_any_request(server, tmp_path, monkeypatch):
    monkeypatch.setenv("NBZOO_OFFLINE", "1")
    with pytest.raises(DownloadError, match="offline"):
        download(f"{server}/data.bin", tmp_path / "data.bin")
    assert RangeHandler.requests == []


def test_glue_archive_downloads_and_unpacks_into_the_seed_layout(server, tmp_path, monkeypatch):
    from nbzoo.data import glue

    archive = tmp_path / "SST-2.zip"
    with zipfile.ZipFile(archive, "w") as zf:  # GLUE's archive layout: SST-2/{train,dev,test}.tsv
        zf.writestr(
            "SST-2/train.tsv", "sentence\tlabel\nhide new secretions from the parental units \t0\n"
        )
        zf.writestr(
            "SST-2/dev.tsv", "sentence\tlabel\nit 's a charming and often affecting journey . \t1\n"
        )
        zf.writestr(
            "SST-2/test.tsv", "index\tsentence\n0\tuneasy mishmash of styles and genres .\n"
        )
    RangeHandler.files["/glue/data/SST-2.zip"] = archive.read_bytes()
    monkeypatch.setitem(glue.URLS, "sst2", f"{server}/glue/data/SST-2.zip")
    folder = glue.download_task(tmp_path / "dataset", "sst2")
    train = glue.read_split(tmp_path / "dataset", "sst2", "train")
    assert folder == tmp_path / "dataset" / "SST-2"
    assert train.text_a == ["hide new secretions from the parental units "] and train.labels == [0]


def test_extract_refuses_paths_outside_the_target(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(DownloadError, match="outside"):
        extract_zip(archive, tmp_path / "out")
