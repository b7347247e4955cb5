"""A mirror of the download hosts on 127.0.0.1, for ``make rehearse``: the notebooks download
their stand-ins through their own download code, from this server instead of the internet.

The folder it serves holds each file under its published URL's ``<host>/<path>``:

* ``dl.fbaipublicfiles.com/glue/data/SST-2.zip`` and the other plain URLs, which
  :mod:`nbzoo.data.download` fetches from ``$NBZOO_MIRROR/<host>/<path>``;
* ``huggingface.co/<repo id>/<file>``, served as the Hugging Face hub serves
  ``/<repo id>/resolve/<revision>/<file>``: huggingface_hub fetches from here with
  ``HF_ENDPOINT=<server>/huggingface.co``. The answer carries the headers the hub client reads:
  ``X-Repo-Commit`` (one fixed commit per repository), ``ETag`` (the file's sha256, as the hub
  gives for large files) and ``Content-Length``; a file the repository lacks is a 404 with
  ``X-Error-Code: EntryNotFound``, an unknown repository one with ``RepoNotFound``.

``Range: bytes=N-`` is honoured (206), as both clients resume with it. Every request is logged
(:attr:`Mirror.requests`), so the rehearsal can say what each run fetched. :meth:`Mirror.corrupt`
makes the server send a file with one byte changed, to show that a download refuses it.

The standard library's http.server: a few dozen lines of request handling, where a web framework
would add a dependency for nothing the clients need.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HUB_HOST = "huggingface.co"
CHUNK = 1 << 20


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def hub_commit(repo_id: str) -> str:
    """The fixed commit hash the mirror gives a hub repository (40 hex digits, as git's)."""
    return hashlib.sha1(f"nbzoo local mirror {repo_id}".encode()).hexdigest()


class Mirror:
    """Serve ``root`` on 127.0.0.1 (a free port) from a thread, until :meth:`close`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.requests: list[dict[str, Any]] = []
        self._corrupt: set[str] = set()
        self._digests: dict[Path, tuple[float, str]] = {}
        self._lock = threading.Lock()
        mirror = self

        class Handler(_Handler):
            pass

        Handler.mirror = mirror
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def hub_endpoint(self) -> str:
        """What ``HF_ENDPOINT`` must be for huggingface_hub to fetch from this mirror."""
        return f"{self.url}/{HUB_HOST}"

    def environment(self) -> dict[str, str]:
        """The variables that send nbzoo's downloads and huggingface_hub's to this mirror."""
        return {
            "NBZOO_MIRROR": self.url,
            "HF_ENDPOINT": self.hub_endpoint,
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }

    def digest(self, path: Path) -> str:
        """The sha256 of a served file (computed once per version of it)."""
        mtime = path.stat().st_mtime
        with self._lock:
            known = self._digests.get(path)
        if known and known[0] == mtime:
            return known[1]
        value = sha256_of(path)
        with self._lock:
            self._digests[path] = (mtime, value)
        return value

    @contextlib.contextmanager
    def corrupt(self, url_path: str) -> Iterator[None]:
        """Serve the file at ``url_path`` with its middle byte changed while in the block."""
        self._corrupt.add(url_path)
        try:
            yield
        finally:
            self._corrupt.discard(url_path)

    def log_since(self, mark: int) -> list[dict[str, Any]]:
        """The requests made after :attr:`requests` had ``mark`` entries."""
        with self._lock:
            return [dict(r) for r in self.requests[mark:]]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Mirror:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Handler(http.server.BaseHTTPRequestHandler):
    mirror: Mirror
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # the mirror keeps its own log
        pass

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    def _locate(self) -> tuple[Path | None, dict[str, str], str | None]:
        """The file a request path names, the hub headers it gets, and the hub's error code
        where the hub would answer 404."""
        path = self.path.split("?", 1)[0]
        root = self.mirror.root
        hub = f"/{HUB_HOST}/"
        if path.startswith(hub) and "/resolve/" in path:
            repo_id, _, rest = path[len(hub) :].partition("/resolve/")
            _revision, _, filename = rest.partition("/")
            repo = root / HUB_HOST / repo_id
            if not repo.is_dir() or not repo.resolve().is_relative_to(root):
                return None, {}, "RepoNotFound"
            file = (repo / filename).resolve()
            if not file.is_relative_to(repo.resolve()) or not file.is_file():
                return None, {"X-Repo-Commit": hub_commit(repo_id)}, "EntryNotFound"
            return file, {"X-Repo-Commit": hub_commit(repo_id)}, None
        if path.startswith(hub):  # the hub's API (model_info, trees): not mirrored
            return None, {}, "EntryNotFound"
        file = (root / path.lstrip("/")).resolve()
        if not file.is_relative_to(root) or not file.is_file():
            return None, {}, None
        return file, {}, None

    def _answer(self, body: bool) -> None:
        file, headers, error = self._locate()
        entry: dict[str, Any] = {"method": self.command, "path": self.path, "bytes": 0}
        if file is None:
            self.send_response(404)
            for key, value in headers.items():
                self.send_header(key, value)
            if error:
                self.send_header("X-Error-Code", error)
            self.send_header("Content-Length", "0")
            self.end_headers()
            entry["status"] = 404
            self._log(entry)
            return
        size = file.stat().st_size
        start = 0
        wanted = self.headers.get("Range", "")
        if wanted.startswith("bytes=") and wanted[6:].endswith("-") and wanted[6:-1].isdigit():
            start = int(wanted[6:-1])
        if start >= size > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            entry["status"] = 416
            self._log(entry)
            return
        digest = self.mirror.digest(file)
        self.send_response(206 if start else 200)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("ETag", f'"{digest}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(size - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        entry.update(status=206 if start else 200, sha256=digest, size=size)
        if body:
            entry["bytes"] = self._send(file, start, size, self.path in self.mirror._corrupt)
        self._log(entry)

    def _send(self, file: Path, start: int, size: int, corrupt: bool) -> int:
        middle = size // 2
        sent = 0
        with open(file, "rb") as f:
            f.seek(start)
            position = start
            while block := f.read(CHUNK):
                if corrupt and position <= middle < position + len(block):
                    i = middle - position
                    block = block[:i] + bytes([block[i] ^ 0xFF]) + block[i + 1 :]
                try:
                    self.wfile.write(block)
                except (BrokenPipeError, ConnectionResetError):
                    break
                position += len(block)
                sent += len(block)
        return sent

    def _log(self, entry: dict[str, Any]) -> None:
        with self.mirror._lock:
            self.mirror.requests.append(entry)
