"""nbzoo.data.download against a real HTTP server on 127.0.0.1: one that honours Range requests,
and the same server misbehaving on purpose (stale resumes, wrong offsets, cut transfers, pages
instead of files)."""

import hashlib
import http.server
import inspect
import socket
import threading
import zipfile
from pathlib import Path

import pytest

from nbzoo.data import DownloadError, download, extract_zip, sources
from nbzoo.data.download import format_problem

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
HTML = b"<!DOCTYPE html>\n<html><body>Please sign in to the network</body></html>\n"


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``files``; ``mode`` picks one way of misbehaving (None: a correct server)."""

    files: dict[str, bytes] = {}
    requests: list[dict] = []
    mode: str | None = None
    break_after: int | None = None  # close the connection after this many body bytes
    validators: str = (
        "both"  # which of ETag / Last-Modified the server sends: both, etag, date, none
    )
    versions: dict[str, int] = {}  # a file's version number: its Last-Modified date

    def send_validators(self, body: bytes):
        if Handler.validators in ("both", "etag"):
            self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()[:16]}"')
        if Handler.validators in ("both", "date"):
            day = 1 + Handler.versions.get(self.path, 0)
            self.send_header("Last-Modified", f"Mon, {day:02d} Nov 2026 10:00:00 GMT")

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = self.files.get(self.path)
        Handler.requests.append({"path": self.path, "range": self.headers.get("Range")})
        if body is None:
            self.send_error(404)
            return
        mode = Handler.mode
        if mode == "no-length":  # HTTP/1.0 style: the body ends when the connection closes
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body[: self.break_after] if self.break_after else body)
            self.close_connection = True
            return
        if mode == "chunked":
            self.protocol_version = "HTTP/1.1"
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            for i in range(0, self.break_after or len(body), 65536):
                chunk = body[i : i + 65536]
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.flush()  # no terminating 0-chunk: the transfer is cut
            self.close_connection = True
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and mode == "if-range" and (condition := self.headers.get("If-Range")):
            # RFC 9110 13.1.5: the range only if the validator still matches, else the whole file
            current = (f'"{hashlib.sha256(body).hexdigest()[:16]}"',)
            if condition not in current:
                rng = None
        if rng:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if mode == "wrong-offset":  # claims 206 but sends the file from its start
                start = 0
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_validators(body)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        chunk = body[start:]
        if Handler.break_after is not None:
            chunk = chunk[: Handler.break_after]
        self.wfile.write(chunk)


@pytest.fixture
def server():
    Handler.files = {"/data.bin": PAYLOAD}
    Handler.requests = []
    Handler.mode = None
    Handler.break_after = None
    Handler.validators = "both"
    Handler.versions = {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def part_of(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def test_downloads_and_verifies_the_hash(server, tmp_path):
    dest = download(f"{server}/data.bin", tmp_path / "d" / "data.bin", sha256=sha(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD
    assert not list(tmp_path.glob("d/*.part"))


def test_an_existing_valid_file_is_not_fetched_again(server, tmp_path):
    dest = tmp_path / "data.bin"
    dest.write_bytes(PAYLOAD)
    download(f"{server}/data.bin", dest, sha256=sha(PAYLOAD))
    assert Handler.requests == []


def test_a_download_with_a_wrong_sha256_leaves_no_file(server, tmp_path):
    with pytest.raises(DownloadError, match="does not match"):
        download(f"{server}/data.bin", tmp_path / "data.bin", sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_a_download_of_another_length_than_the_published_one_leaves_no_file(server, tmp_path):
    with pytest.raises(DownloadError, match="published one 1000"):
        download(f"{server}/data.bin", tmp_path / "data.bin", sha256=None, size=1000)
    assert list(tmp_path.iterdir()) == []


def test_every_caller_must_say_which_sha256_it_expects():
    assert inspect.signature(download).parameters["sha256"].default is inspect.Parameter.empty


def test_every_download_nbzoo_knows_states_its_published_sha256_or_that_none_is():
    from nbzoo.data import glue, gpt2_bpe

    assert sources.GLUE_SST2.sha256 == (
        "d67e16fb55739c1b32cdce9877596db1c127dc322d93c082281f64057c16deaa"
    )
    assert sources.GLUE_STSB.sha256 == (
        "e60a6393de5a8b5b9bac5020a1554b54e3691f9d600b775bd131e613ac179c85"
    )
    for remote in sources.KNOWN.values():
        assert remote.sha256 is not None or remote.checksum_source.startswith("none published")
    assert set(glue.ARCHIVES.values()) | set(gpt2_bpe.GPT2_BPE_FILES.values()) | {
        sources.ROBERTA_BASE
    } == set(sources.KNOWN.values())


def test_the_glue_download_passes_the_published_sha256(tmp_path, monkeypatch):
    from nbzoo.data import glue

    calls = []

    def fake_download(url, dest, *, sha256, size=None, timeout=30.0, owner=None):
        calls.append((url, sha256, size))
        raise DownloadError("stop here")

    monkeypatch.setattr(glue, "download", fake_download)
    with pytest.raises(DownloadError, match="stop here"):
        glue.download_task(tmp_path, "sst2")
    assert calls == [(sources.GLUE_SST2.url, sources.GLUE_SST2.sha256, 7_439_277)]


def test_a_partial_file_resumes_with_a_range_request(server, tmp_path):
    dest = tmp_path / "data.bin"
    part_of(dest).write_bytes(PAYLOAD[:300_000])
    download(f"{server}/data.bin", dest, sha256=sha(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD
    assert Handler.requests[-1]["range"] == "bytes=300000-"


def test_a_broken_transfer_is_kept_and_resumed_next_time(server, tmp_path):
    dest = tmp_path / "data.bin"
    Handler.break_after = 400_000
    with pytest.raises(DownloadError, match="incomplete|broke off"):
        download(f"{server}/data.bin", dest, sha256=sha(PAYLOAD))
    assert not dest.exists()
    assert part_of(dest).stat().st_size == 400_000
    Handler.break_after = None
    download(f"{server}/data.bin", dest, sha256=sha(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD


def test_a_stale_part_larger_than_the_file_is_not_installed_when_the_server_answers_416(
    server, tmp_path
):
    dest = tmp_path / "data.bin"
    part_of(dest).write_bytes(PAYLOAD + b"left over from another file")
    download(f"{server}/data.bin", dest, sha256=sha(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD
    assert [r["range"] for r in Handler.requests] == [f"bytes={len(PAYLOAD) + 27}-", None]
    assert not part_of(dest).exists()


def test_a_complete_part_is_installed_after_a_416_only_once_verified(server, tmp_path):
    dest = tmp_path / "data.bin"
    part_of(dest).write_bytes(PAYLOAD)
    download(f"{server}/data.bin", dest, sha256=sha(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD
    bad = tmp_path / "bad.bin"
    part_of(bad).write_bytes(bytes(len(PAYLOAD)))  # as long as the file, other bytes
    Handler.files["/bad.bin"] = PAYLOAD
    with pytest.raises(DownloadError, match="does not match"):
        download(f"{server}/bad.bin", bad, sha256=sha(PAYLOAD))
    assert not bad.exists() and not part_of(bad).exists()


def test_a_transfer_cut_short_without_content_length_is_not_installed(server, tmp_path):
    dest = tmp_path / "data.bin"
    Handler.mode, Handler.break_after = "no-length", 300_000
    with pytest.raises(DownloadError, match="stated no length and no checksum"):
        download(f"{server}/data.bin", dest, sha256=None)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DownloadError, match="does not match"):
        download(f"{server}/data.bin", dest, sha256=sha(PAYLOAD))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DownloadError, match="incomplete"):
        download(f"{server}/data.bin", dest, sha256=None, size=len(PAYLOAD))
    assert not dest.exists()


def test_a_206_from_the_wrong_offset_is_not_appended(server, tmp_path):
    dest = tmp_path / "data.bin"
    part_of(dest).write_bytes(PAYLOAD[:300_000])
    Handler.mode = "wrong-offset"
    download(f"{server}/data.bin", dest, sha256=sha(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD
    assert [r["range"] for r in Handler.requests] == ["bytes=300000-", None]


def test_a_cut_chunked_download_ends_in_a_clear_message(server, tmp_path):
    dest = tmp_path / "data.bin"
    Handler.mode, Handler.break_after = "chunked", 300_000
    with pytest.raises(DownloadError, match=r"broke off after \d+ bytes \(IncompleteRead"):
        download(f"{server}/data.bin", dest, sha256=sha(PAYLOAD))
    assert not dest.exists()


def _glue_archive(path: Path) -> bytes:
    with zipfile.ZipFile(path, "w") as zf:  # GLUE's archive layout: SST-2/{train,dev,test}.tsv
        zf.writestr(
            "SST-2/train.tsv", "sentence\tlabel\nhide new secretions from the parental units \t0\n"
        )
        zf.writestr(
            "SST-2/dev.tsv", "sentence\tlabel\nit 's a charming and often affecting journey . \t1\n"
        )
        zf.writestr(
            "SST-2/test.tsv", "index\tsentence\n0\tuneasy mishmash of styles and genres .\n"
        )
    return path.read_bytes()


def _serve_glue(monkeypatch, server, body: bytes) -> None:
    from nbzoo.data import glue

    Handler.files["/glue/data/SST-2.zip"] = body
    url = f"{server}/glue/data/SST-2.zip"
    monkeypatch.setitem(glue.ARCHIVES, "sst2", sources.Remote(url, sha(body), len(body), "test"))


def test_glue_archive_downloads_and_unpacks_into_the_seed_layout(server, tmp_path, monkeypatch):
    from nbzoo.data import glue

    _serve_glue(monkeypatch, server, _glue_archive(tmp_path / "SST-2.zip"))
    folder = glue.download_task(tmp_path / "dataset", "sst2")
    train = glue.read_split(tmp_path / "dataset", "sst2", "train")
    assert folder == tmp_path / "dataset" / "SST-2"
    assert train.text_a == ["hide new secretions from the parental units "] and train.labels == [0]


def test_an_html_page_saved_as_the_archive_is_named_and_replaced_by_the_verified_one(
    server, tmp_path, monkeypatch, capsys
):
    from nbzoo import safe_write
    from nbzoo.data import glue

    _serve_glue(monkeypatch, server, _glue_archive(tmp_path / "SST-2.zip"))
    data = tmp_path / "dataset"
    # what an earlier run left in nbzoo's own folder (a captive portal's page)
    safe_write.claim(data, "test").write_bytes("SST-2.zip", HTML)
    glue.download_task(data, "sst2")
    assert "SST-2.zip is an HTML page" in capsys.readouterr().out
    assert zipfile.is_zipfile(data / "SST-2.zip")
    assert len(glue.read_split(data, "sst2", "dev")) == 1


def test_an_html_page_of_the_users_in_the_data_folder_is_refused_not_replaced(
    server, tmp_path, monkeypatch
):
    from nbzoo import safe_write
    from nbzoo.data import glue

    _serve_glue(monkeypatch, server, _glue_archive(tmp_path / "SST-2.zip"))
    data = tmp_path / "dataset"
    safe_write.claim(data, "test")
    (data / "SST-2.zip").write_bytes(HTML)  # the user's own file, in nbzoo's folder
    with pytest.raises(DownloadError, match="nbzoo did not write it"):
        glue.download_task(data, "sst2")
    assert (data / "SST-2.zip").read_bytes() == HTML and Handler.requests == []


def test_an_html_page_served_instead_of_a_file_without_checksum_is_refused(server, tmp_path):
    Handler.files["/SST-2.zip"] = HTML
    with pytest.raises(DownloadError, match="is an HTML page"):
        download(f"{server}/SST-2.zip", tmp_path / "SST-2.zip", sha256=None)
    assert list(tmp_path.iterdir()) == []


def test_format_checks_know_zip_tar_gz_and_html(tmp_path):
    import tarfile

    good_zip, good_tgz, html = tmp_path / "a.zip", tmp_path / "b.tar.gz", tmp_path / "c.json"
    _glue_archive(good_zip)
    with tarfile.open(good_tgz, "w:gz") as tar:
        tar.add(good_zip, arcname="a.zip")
    html.write_bytes(HTML)
    assert format_problem(good_zip) is None and format_problem(good_tgz) is None
    assert "HTML page" in format_problem(html)
    cut = tmp_path / "cut.zip"
    cut.write_bytes(good_zip.read_bytes()[:-30])
    assert "not a zip archive" in format_problem(cut)
    assert "not a gzip file" in format_problem(good_zip, "x.tar.gz")


def test_http_errors_name_the_status(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{server}/missing.zip", tmp_path / "missing.zip", sha256=None)


def test_without_network_the_message_names_url_and_local_path(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "glue" / "SST-2.zip"
    with pytest.raises(DownloadError) as info:
        download(f"http://127.0.0.1:{port}/glue/data/SST-2.zip", dest, sha256=None, timeout=2)
    message = str(info.value)
    assert f"http://127.0.0.1:{port}/glue/data/SST-2.zip" in message
    assert str(dest.resolve()) in message


def test_offline_mode_fails_before_any_request(server, tmp_path, monkeypatch):
    monkeypatch.setenv("NBZOO_OFFLINE", "1")
    with pytest.raises(DownloadError, match="offline"):
        download(f"{server}/data.bin", tmp_path / "data.bin", sha256=None)
    assert Handler.requests == []


def test_extract_refuses_paths_outside_the_target(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../escape.txt", "x")
    with pytest.raises(DownloadError, match="outside"):
        extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()


def test_extract_keeps_the_users_files_in_an_existing_task_folder(tmp_path):
    archive = tmp_path / "SST-2.zip"
    _glue_archive(archive)
    data = tmp_path / "dataset"
    (data / "SST-2").mkdir(parents=True)
    (data / "SST-2" / "notes.txt").write_text("my notes")
    extract_zip(archive, data)
    assert (data / "SST-2" / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in (data / "SST-2").iterdir()) == [
        "dev.tsv",
        "notes.txt",
        "test.tsv",
        "train.tsv",
    ]
    (data / "SST-2" / "train.tsv").write_text("sentence\tlabel\nmy own row\t1\n")
    (data / "SST-2" / "dev.tsv").unlink()
    with pytest.raises(DownloadError, match=r"would replace different files.*train\.tsv"):
        extract_zip(archive, data)
    assert (data / "SST-2" / "train.tsv").read_text() == "sentence\tlabel\nmy own row\t1\n"
    assert not (data / "SST-2" / "dev.tsv").exists()
    assert sorted(p.name for p in data.iterdir()) == ["SST-2"]


# --- resuming without a published checksum (issue 26, defect 5) --------------------------------

NEWER = bytes(reversed(PAYLOAD))  # the same length, other bytes: the file changed on the server


def _cut_then_change(server: str, dest: Path) -> None:
    """A first attempt broken off after 400 kB of the file, which then changes on the server."""
    Handler.break_after = 400_000
    with pytest.raises(DownloadError, match="broke off|incomplete"):
        download(f"{server}/data.bin", dest, sha256=None)
    assert part_of(dest).stat().st_size == 400_000
    Handler.break_after = None
    Handler.files["/data.bin"] = NEWER
    Handler.versions["/data.bin"] = 1


@pytest.mark.parametrize("validators", ["both", "etag", "date"])
def test_a_part_of_a_file_that_changed_on_the_server_is_not_spliced_onto_the_new_one(
    server, tmp_path, validators
):
    Handler.validators = validators
    dest = tmp_path / "data.bin"
    _cut_then_change(server, dest)
    download(f"{server}/data.bin", dest, sha256=None)
    assert dest.read_bytes() == NEWER
    assert not part_of(dest).exists()


def test_a_server_that_honours_if_range_sends_the_whole_new_file(server, tmp_path):
    Handler.mode = "if-range"
    dest = tmp_path / "data.bin"
    _cut_then_change(server, dest)
    download(f"{server}/data.bin", dest, sha256=None)
    assert dest.read_bytes() == NEWER
    assert Handler.requests[-1]["range"] == "bytes=400000-"  # asked, and was sent the whole file


def test_an_unchanged_file_resumes_where_the_part_ends(server, tmp_path):
    dest = tmp_path / "data.bin"
    Handler.break_after = 400_000
    with pytest.raises(DownloadError):
        download(f"{server}/data.bin", dest, sha256=None)
    Handler.break_after = None
    download(f"{server}/data.bin", dest, sha256=None)
    assert dest.read_bytes() == PAYLOAD
    assert Handler.requests[-1]["range"] == "bytes=400000-"


def test_a_part_of_unknown_origin_is_not_resumed_without_a_checksum(server, tmp_path):
    dest = tmp_path / "data.bin"
    part_of(dest).write_bytes(NEWER[:300_000])  # no record of what it was started from
    download(f"{server}/data.bin", dest, sha256=None)
    assert dest.read_bytes() == PAYLOAD
    assert [r["range"] for r in Handler.requests] == [None]


@pytest.mark.parametrize("validators", ["both", "none"])
def test_a_stale_part_answered_with_416_is_never_installed_unverified(server, tmp_path, validators):
    Handler.validators = validators
    dest = tmp_path / "data.bin"
    part_of(dest).write_bytes(NEWER)  # as long as the file: the server answers 416
    download(f"{server}/data.bin", dest, sha256=None)
    assert dest.read_bytes() == PAYLOAD


def test_a_damaged_archive_is_kept_until_a_verified_one_replaces_it(server, tmp_path):
    dest = tmp_path / "SST-2.zip"
    dest.write_bytes(HTML)  # damaged: not a zip
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{server}/missing/SST-2.zip", dest, sha256=None)
    assert dest.read_bytes() == HTML
    archive = _glue_archive(tmp_path / "good.zip")
    Handler.files["/SST-2.zip"] = archive
    Handler.break_after = 100
    with pytest.raises(DownloadError):
        download(f"{server}/SST-2.zip", dest, sha256=sha(archive))
    assert dest.read_bytes() == HTML
    Handler.break_after = None
    download(f"{server}/SST-2.zip", dest, sha256=sha(archive))
    assert dest.read_bytes() == archive
