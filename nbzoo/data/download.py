"""Downloads that are atomic, resumable, hash-checked and honest about being offline.

The file is fetched into ``<dest>.part``; an interrupted download resumes from there with an HTTP
``Range`` request; the hash is checked before the final rename, so ``dest`` is either complete or
absent. Uses urllib from the standard library (no extra dependency for a 60-line job).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

CHUNK = 1 << 20


class DownloadError(RuntimeError):
    pass


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


def download(
    url: str, dest: str | os.PathLike, sha256: str | None = None, timeout: float = 30.0
) -> Path:
    """Fetch ``url`` to ``dest`` unless a complete, hash-valid file is already there."""
    dest = Path(dest)
    if dest.exists():
        if sha256 is None or sha256_of(dest) == sha256:
            return dest
        raise DownloadError(
            f"{dest} exists but its sha256 is {sha256_of(dest)}, expected {sha256}; delete it to re-download"
        )
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("NBZOO_OFFLINE") == "1":
        raise DownloadError(_offline_message(url, dest, "offline mode is set"))
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the partial file is already complete
            response = None
        else:
            raise DownloadError(f"cannot download {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise DownloadError(_offline_message(url, dest, getattr(exc, "reason", exc))) from None
    if response is not None:
        with response:
            resumed = response.status == 206
            if not resumed:
                have = 0  # the server ignored Range: start over
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            with (
                open(part, "ab" if resumed else "wb") as out,
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
                except (OSError, TimeoutError) as exc:
                    raise DownloadError(
                        f"download of {url} broke off after {out.tell()} bytes ({exc}); "
                        f"run again to resume from {part}"
                    ) from None
            if total is not None and part.stat().st_size != total:
                raise DownloadError(
                    f"download of {url} is incomplete ({part.stat().st_size} of {total} bytes); run again to resume"
                )
    if sha256 is not None and (got := sha256_of(part)) != sha256:
        part.unlink()
        raise DownloadError(
            f"{url}: sha256 {got} does not match the expected {sha256}; the partial file was removed"
        )
    os.replace(part, dest)
    return dest


def extract_zip(archive: str | os.PathLike, into: str | os.PathLike) -> Path:
    """Unpack a zip into ``into`` through a temporary folder, refusing paths that escape it."""
    into = Path(into)
    tmp = into.with_name(into.name + ".extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(archive) as zf:
        for member in zf.namelist():
            target = (tmp / member).resolve()
            if not str(target).startswith(str(tmp.resolve())):
                raise DownloadError(f"{archive}: member {member!r} would be written outside {into}")
        zf.extractall(tmp)
    into.mkdir(parents=True, exist_ok=True)
    for item in tmp.iterdir():
        target = into / item.name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        item.rename(target)
    tmp.rmdir()
    return into
