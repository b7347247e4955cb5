"""Downloads that are atomic, resumable, verified and honest about being offline.

The file is fetched into ``<dest>.part`` and renamed to ``dest`` only once it is verified: its
length against the server's statement and the published size, its sha256 against the published
one, its format against its name (a ``.zip`` must be a zip archive, a ``.tar.gz`` a gzipped tar,
nothing may be an HTML page). An interrupted download resumes from the ``.part`` with an HTTP
``Range`` request, and the server's answer is checked before a byte is appended: a ``206`` must
start where the partial file ends (``Content-Range``), a ``416`` must say the file is exactly as
long as the partial one; otherwise the partial file is dropped and the download starts again.

Without a published checksum nothing at the end can tell a file spliced from two versions of
it, so a ``.part`` is continued only when the file is provably the one it was started from: the
``ETag`` / ``Last-Modified`` of the first response are kept beside it (``<dest>.part.json``), sent
back as ``If-Range`` (a server that honours it sends the whole file when it changed) and compared
with the answer's own. A ``.part`` without them, one of a changed file, and one answered with
``416`` (which says nothing of its bytes) start again from zero.

A damaged file already at ``dest`` (an HTML page saved as the archive, an archive cut short)
stays where it is until a verified download replaces it: a failed download never costs the file
that was there.

Two environment variables reroute a download without changing what is checked:

* ``NBZOO_MIRROR``: a base URL that serves the published URLs' files under ``<host><path>``
  (``$NBZOO_MIRROR/dl.fbaipublicfiles.com/glue/data/SST-2.zip``), e.g. a lab's own mirror, or the
  local server of ``make rehearse``;
* ``NBZOO_CHECKSUMS``: a file of ``<sha256> <size> <url>`` lines whose checksums replace the
  published ones for those URLs (a mirror of re-packed archives; the rehearsal's stand-ins). Each
  download says which checksum it verified against.

Every download of a process is listed by :func:`fetched` (what, from where, how it was verified),
which the results records carry as ``downloaded``.

Uses urllib from the standard library: the verification is the point, and no client library
checks ``Content-Range`` against the requested offset for us.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import json
import os
import re
import secrets
import shutil
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from nbzoo import safe_write

CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"^bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)$")


MIRROR_ENV, CHECKSUMS_ENV = "NBZOO_MIRROR", "NBZOO_CHECKSUMS"
_FETCHED: list[dict[str, Any]] = []


class DownloadError(RuntimeError):
    pass


def fetched() -> list[dict[str, Any]]:
    """Every download of this process so far (also the ones found already in place, verified):
    the published URL, the URL it came from, the file, its length and sha256, how it was
    verified."""
    return [dict(entry) for entry in _FETCHED]


def mirrored(url: str) -> str:
    """``url`` as ``NBZOO_MIRROR`` serves it (``<mirror>/<host><path>``), or ``url`` itself."""
    mirror = os.environ.get(MIRROR_ENV, "").rstrip("/")
    if not mirror:
        return url
    parts = urllib.parse.urlsplit(url)
    return f"{mirror}/{parts.netloc}{parts.path}" + (f"?{parts.query}" if parts.query else "")


def checksum_overrides(path: str | os.PathLike | None = None) -> dict[str, tuple[str, int]]:
    """The ``NBZOO_CHECKSUMS`` file's ``url -> (sha256, size)`` (empty where it is not set)."""
    path = path or os.environ.get(CHECKSUMS_ENV, "")
    if not path:
        return {}
    table = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DownloadError(f"{CHECKSUMS_ENV}={path}: cannot read it ({exc.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split()
        if (
            len(fields) != 3
            or not re.fullmatch(r"[0-9a-f]{64}", fields[0])
            or not fields[1].isdigit()
        ):
            raise DownloadError(
                f"{path}, line {n}: expected '<sha256> <size> <url>' (64 lowercase hex digits, "
                f"a byte count, the published URL), got {line.strip()!r}"
            )
        table[fields[2]] = (fields[0], int(fields[1]))
    return table


class _Restart(Exception):
    """The partial file cannot be resumed: the download starts again from its first byte."""


def sha256_of(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _offline_message(url: str, dest: Path, reason: object) -> str:
    return (
        f"cannot download {url} ({reason}). Without network, fetch it elsewhere and place it at "
        f"{dest.resolve()}"
    )


def format_problem(path: Path, name: str | None = None) -> str | None:
    """Why the file at ``path`` is not what a file called ``name`` should be, or None.

    Catches what servers send instead of a file (a login or error page) and archives cut short.
    """
    name = (name or path.name).lower()
    with open(path, "rb") as f:
        head = f.read(512)
    if not name.endswith((".html", ".htm")) and head.lstrip()[:15].lower().startswith(
        (b"<!doctype html", b"<html")
    ):
        return f"is an HTML page, not the file (it starts with {head.lstrip()[:40]!r})"
    if name.endswith(".zip") and not zipfile.is_zipfile(path):
        return f"is not a zip archive (it starts with {head[:16]!r})"
    if name.endswith((".tar.gz", ".tgz")):
        if head[:2] != b"\x1f\x8b":
            return f"is not a gzip file (it starts with {head[:16]!r})"
        try:
            with gzip.open(path) as gz:
                gz.read(tarfile.BLOCKSIZE)
            if not tarfile.is_tarfile(path):
                return "is a gzip file but not a tar archive"
        except (OSError, EOFError) as exc:
            return f"is a damaged gzip file ({exc})"
    return None


def _content_range(value: str | None) -> tuple[int | None, int | None, int | None]:
    """``bytes START-END/TOTAL`` (or ``bytes */TOTAL``) → (start, end, total); Nones where
    absent or ``*``."""
    m = _CONTENT_RANGE.match((value or "").strip())
    if not m:
        return None, None, None
    start, end, total = m.groups()
    return (
        int(start) if start is not None else None,
        int(end) if end is not None else None,
        int(total) if total not in (None, "*") else None,
    )


def _validators_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _validators(headers) -> dict[str, str]:
    """The server's ``ETag`` (strong ones only: a weak one does not promise the same bytes) and
    ``Last-Modified`` of a response."""
    found = {}
    etag = (headers.get("ETag") or "").strip()
    if etag and not etag.startswith("W/"):
        found["etag"] = etag
    if modified := (headers.get("Last-Modified") or "").strip():
        found["last_modified"] = modified
    return found


def _read_validators(part: Path, url: str) -> dict[str, str]:
    try:
        data = json.loads(_validators_path(part).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("url") != url:
        return {}
    return {k: v for k, v in data.items() if k in ("etag", "last_modified") and isinstance(v, str)}


def _same_file(started: dict[str, str], now: dict[str, str]) -> bool:
    """The answer is of the file the ``.part`` was started from: every validator both sides
    state agrees, and they share at least one."""
    shared = [k for k in started if k in now]
    return bool(shared) and all(started[k] == now[k] for k in shared)


def _drop_part(part: Path) -> None:
    part.unlink(missing_ok=True)
    _validators_path(part).unlink(missing_ok=True)


def _fetch(
    url: str, dest: Path, part: Path, timeout: float, resume: bool, checksum: bool
) -> int | None:
    """Write ``url``'s body into ``part`` (appending when a resumed transfer is valid); return the
    whole file's length as the server stated it, or None when it stated none. ``checksum``: a
    published sha256 will verify the result, so a ``.part`` may resume without validators."""
    have = part.stat().st_size if resume and part.exists() else 0
    started = _read_validators(part, url) if have else {}
    if have and not checksum and not started:
        raise _Restart(
            f"{part.name} has no record of the file it was started from and no checksum is "
            "published, so its bytes cannot be trusted"
        )
    headers = {}
    if have:
        headers["Range"] = f"bytes={have}-"
        if condition := started.get("etag") or started.get("last_modified"):
            headers["If-Range"] = condition
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        with exc:
            if exc.code == 416 and have:
                total = _content_range(exc.headers.get("Content-Range"))[2]
                if total == have and (checksum or _same_file(started, _validators(exc.headers))):
                    return total  # the partial file holds every byte; verified by the caller
                raise _Restart(
                    f"the server refused to resume at byte {have} (HTTP 416; the file has "
                    f"{'an unstated number of' if total is None else total} bytes"
                    + ("" if checksum else ", and nothing shows the partial file is of it")
                    + ")"
                ) from None
            raise DownloadError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as exc:
        raise DownloadError(_offline_message(url, dest, getattr(exc, "reason", exc))) from None
    with response:
        length = response.headers.get("Content-Length")
        length = int(length) if length is not None and length.strip().isdigit() else None
        now = _validators(response.headers)
        if response.status == 206:
            start, end, total = _content_range(response.headers.get("Content-Range"))
            if start != have:
                raise _Restart(
                    f"asked for the bytes from {have} on, the server sent "
                    + ("no Content-Range" if start is None else f"bytes from {start} on")
                )
            if length is not None and end is not None and length != end - start + 1:
                raise _Restart(
                    f"Content-Range {start}-{end} disagrees with Content-Length {length}"
                )
            if started and not _same_file(started, now):
                raise _Restart(
                    f"the file changed on the server since {part.name} was started "
                    f"({started} then, {now or 'no ETag / Last-Modified'} now)"
                )
            if total is None and length is not None:
                total = have + length
            mode = "ab"
        else:  # the whole file: a changed file (If-Range), or a server that ignores Range
            have, total, mode = 0, length, "wb"
            _validators_path(part).write_text(json.dumps({"url": url, **now}), encoding="utf-8")
        with (
            open(part, mode) as out,
            tqdm(
                total=total,
                initial=have,
                unit="B",
                unit_scale=True,
                desc=dest.name,
                mininterval=1.0,
            ) as bar,
        ):
            try:
                while block := response.read(CHUNK):
                    out.write(block)
                    bar.update(len(block))
            except (OSError, http.client.HTTPException) as exc:
                reason = type(exc).__name__ if not str(exc) else f"{type(exc).__name__}: {exc}"
                raise DownloadError(
                    f"download of {url} broke off after {out.tell()} bytes ({reason}); "
                    f"run again to resume from {part}"
                ) from None
    return total


def _check_existing(
    dest: Path, url: str, sha256: str | None, owner: safe_write.Owned | None
) -> bool:
    """True when ``dest`` may be used as it is. A file that is not what its name says (an HTML
    page saved as a .zip) is fetched again -- and stays until a verified file replaces it; a
    well-formed file with another sha256 is left alone and refused."""
    if problem := format_problem(dest):
        if owner is not None and not safe_write.owns(dest):
            raise DownloadError(
                f"{dest} {problem}, and nbzoo did not write it: move it away or delete it to "
                f"download {url}"
            )
        print(f"{dest} {problem}: downloading {url} again (it stays until a verified file is in)")
        return False
    if sha256 is not None and (got := sha256_of(dest)) != sha256:
        raise DownloadError(
            f"{dest} exists but its sha256 is {got}, where {url} is published as {sha256}: "
            "move it away or delete it to download the published file"
        )
    return True


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None,
    size: int | None = None,
    timeout: float = 30.0,
    owner: safe_write.Owned | None = None,
) -> Path:
    """Fetch ``url`` to ``dest`` unless a verified file is already there.

    ``sha256`` is required: the published checksum, or None where the publisher gives none (say
    so next to the URL; see nbzoo.data.sources). ``size`` is the published length, if any.
    ``owner``: the nbzoo folder (nbzoo.safe_write) ``dest`` lies in; the file is installed
    through it, so it replaces only a file nbzoo wrote. Nothing unverified is ever installed at
    ``dest``, and what is there stays until a verified file replaces it; a verification failure
    removes the partial file, an interrupted transfer keeps it for the next run to resume.
    """
    dest = Path(dest)
    published, source = url, mirrored(url)
    checksum_from = "the published sha256" if sha256 is not None else None
    if published in (overrides := checksum_overrides()):
        sha256, size = overrides[published]
        checksum_from = f"the sha256 of {os.environ[CHECKSUMS_ENV]} ({CHECKSUMS_ENV})"
    if dest.exists() and _check_existing(dest, url, sha256, owner):
        _log(
            published, None, dest, checksum_from or "no checksum published: the file found in place"
        )
        return dest
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("NBZOO_OFFLINE") == "1":
        raise DownloadError(_offline_message(url, dest, "offline mode is set"))
    if source != published:
        print(f"{dest.name}: downloading {published} from {source} ({MIRROR_ENV})", flush=True)
    url = source
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if part.exists() and size is not None and part.stat().st_size > size:
        _drop_part(part)  # longer than the published file: it belongs to something else
    checksum = sha256 is not None
    try:
        total = _fetch(url, dest, part, timeout, resume=True, checksum=checksum)
    except _Restart as why:
        print(f"{dest.name}: {why}; downloading it again from the start")
        _drop_part(part)
        try:
            total = _fetch(url, dest, part, timeout, resume=False, checksum=checksum)
        except _Restart as again:
            _drop_part(part)
            raise DownloadError(f"cannot download {url}: {again}") from None

    def reject(why: str) -> DownloadError:
        _drop_part(part)
        return DownloadError(f"{url}: {why}; the partial file was removed")

    got = part.stat().st_size
    if size is not None and total is not None and total != size:
        raise reject(f"the server's file has {total} bytes, the published one {size}")
    expected = total if total is not None else size
    if expected is not None and got < expected:
        raise DownloadError(
            f"download of {url} is incomplete ({got} of {expected} bytes); run again to resume "
            f"from {part}"
        )
    if expected is not None and got > expected:
        raise reject(f"{got} bytes received, {expected} expected")
    if sha256 is not None:
        if (digest := sha256_of(part)) != sha256:
            raise reject(f"sha256 {digest} does not match {checksum_from}, {sha256}")
    elif expected is None:
        raise reject(
            "the server stated no length and no checksum is published, so a complete file "
            "cannot be told from one cut short"
        )
    if problem := format_problem(part, dest.name):
        raise reject(f"the download {problem}")
    if owner is not None:
        owner.install(dest.relative_to(owner.root), part)
    else:
        os.replace(part, dest)
    _validators_path(part).unlink(missing_ok=True)
    _log(published, source, dest, checksum_from or "no checksum published: its length as stated")
    return dest


def _log(url: str, source: str | None, dest: Path, verified: str) -> None:
    """Add a download to :func:`fetched`; ``source`` None: the file was in place already."""
    if verified.startswith("the "):
        verified = f"sha256 equal to {verified}"
    _FETCHED.append(
        {
            "url": url,
            "from": source,
            "file": str(dest),
            "bytes": dest.stat().st_size,
            "sha256": sha256_of(dest),
            "verified": verified + ", format checked",
        }
    )


def extract_zip(
    archive: str | os.PathLike,
    into: str | os.PathLike,
    owner: safe_write.Owned | None = None,
) -> Path:
    """Unpack a zip into ``into``, all or nothing, refusing paths that escape it.

    The archive is unpacked into a temporary folder beside ``into`` first; files already in
    ``into`` are kept: a member lands only where no file is, or where the file there has the same
    bytes. Before anything is moved every conflict is found -- a member that would replace a
    different file, a file where the archive has a folder, a folder where it has a file -- and
    one of them stops the extraction with nothing written. A move that fails (a full disk) takes
    back the members already moved. ``owner``: the nbzoo folder (nbzoo.safe_write) holding
    ``into``; the members are recorded in its marker.
    """
    archive, into = Path(archive), Path(into)
    if problem := format_problem(archive):
        raise DownloadError(f"{archive} {problem}: delete it and download it again")
    tmp = into.with_name(f".{into.name}.nbzoo-tmp-{os.getpid()}-{secrets.token_hex(4)}")
    moved: list[Path] = []
    made: list[Path] = []
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                if not (tmp / member).resolve().is_relative_to(tmp.resolve()):
                    raise DownloadError(
                        f"{archive}: member {member!r} would be written outside {into}"
                    )
            try:
                zf.extractall(tmp)
            except (zipfile.BadZipFile, EOFError) as exc:
                raise DownloadError(
                    f"{archive}: damaged zip archive ({exc}); delete it and download it again"
                ) from None
        files = sorted(p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file())
        conflicts = [rel for rel in files if _conflict(into, tmp, rel)]
        if conflicts:
            shown = ", ".join(str(into / c) for c in conflicts[:5])
            raise DownloadError(
                f"{archive}: not unpacked, {len(conflicts)} of its files would replace different "
                f"files or folders already there ({shown}{', ...' if len(conflicts) > 5 else ''}"
                "); move them away first"
            )
        try:
            for rel in files:
                target = into / rel
                if target.exists():
                    continue  # the same bytes are there already
                for parent in reversed(rel.parents[:-1]):
                    if not (into / parent).exists():
                        (into / parent).mkdir(parents=True)
                        made.append(into / parent)
                if owner is not None:
                    owner.install(target.relative_to(owner.root), tmp / rel)
                else:
                    os.replace(tmp / rel, target)
                moved.append(target)
        except BaseException:
            for target in reversed(moved):  # ours: the members this call put there
                if owner is not None:
                    owner.remove(target.relative_to(owner.root))
                else:
                    target.unlink(missing_ok=True)
            for folder in reversed(made):
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return into


def _conflict(into: Path, tmp: Path, rel: Path) -> bool:
    """The member ``rel`` (unpacked in ``tmp``) cannot be placed in ``into`` as it is: a file
    stands where it needs a folder, or something other than the same bytes stands in its place."""
    for parent in rel.parents[:-1]:
        path = into / parent
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            return True
    target = into / rel
    if not target.exists() and not target.is_symlink():
        return False
    return target.is_symlink() or not target.is_file() or sha256_of(target) != sha256_of(tmp / rel)
