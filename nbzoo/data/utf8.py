"""Reading text files that must be UTF-8, with errors that name the file and the line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def decode(path: str | os.PathLike, raw: bytes, error: type[Exception] = ValueError) -> str:
    """``raw`` (the bytes of ``path``) as text; bytes that are not UTF-8 raise ``error`` naming
    the file, the line and the byte offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise error(
            f"{path}, line {line}: not UTF-8 text ({exc.reason}: byte "
            f"{raw[exc.start : exc.start + 1].hex()} at offset {exc.start})"
        ) from None


def read_text(path: str | os.PathLike, error: type[Exception] = ValueError) -> str:
    return decode(path, Path(path).read_bytes(), error)


def read_json(path: str | os.PathLike, error: type[Exception] = ValueError) -> Any:
    """A JSON file; undecodable bytes or bad JSON raise ``error`` naming the file and line."""
    text = read_text(path, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg})") from None
