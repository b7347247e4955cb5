"""One rule for every writer in nbzoo: the user's files are never overwritten, replaced or deleted.

* **Only nbzoo's folders are written.** A writer writes into a folder it created or one that
  carries nbzoo's marker, :data:`MARKER` (``.nbzoo-owned``): a JSON file naming the writer and
  listing every file nbzoo put there with its size and modification time. :func:`claim` makes a
  folder nbzoo's: it creates a missing folder and marks it, marks an empty one, and refuses one
  that holds anything else -- one clear line naming a file nbzoo did not write.
* **Every file through a temporary name.** A file is written to a hidden temporary name beside
  its place (``.<name>.nbzoo-tmp-<pid>-<token>``) and renamed over it only when complete; a
  folder is built the same way and swapped in whole.
* **Only nbzoo's own files are replaced or deleted.** An existing file is replaced only when the
  marker lists it and it is unchanged since (same size and modification time: a file the user
  edited is theirs again); a folder is replaced or removed only when every file in it is.

Folders nbzoo wrote before the marker existed carry none. Such a folder is *adopted* (marked) only
when its writer can show that every file in it is exactly what it would write now, byte for byte
(the demo data generators do: ``adopt`` of :func:`claim`); anything else -- older checkpoints,
outputs, a folder of the user's that happens to hold the same file names -- is refused, and the
message says to move it away or name another folder. A folder whose only content is folders
carrying their own marker is nbzoo's as well (a checkpoint folder whose ``training/`` was claimed
first).

Three kinds of place follow the same rule with one difference each:

* **Files beside a folder** (ais_bench's ``<name>_summary.json`` next to ``<name>/``): listed in
  that folder's marker (:func:`write_beside`), replaced only while listed unchanged.
* **Output folders the user or the project names** (``results/``, a run's ``output_dir``):
  :func:`write_output_file` adds its file there and replaces a file of that name only when a
  marker lists it or the writer recognises it as its own output (a results record naming its
  notebook); it never needs the folder to be marked, so a user may point several tools at one.
* **nbzoo's scratch folders** (``build/rehearse``, ``build/notebooks-run``): marked as scratch
  by :func:`claim_scratch`, everything in them is nbzoo's (the marker says so, and to keep
  nothing there); an existing folder that is not one is refused like any other.

The leftovers of a writer that died (a temporary ``.nbzoo-tmp-<pid>-`` file of a process that is
gone) inside a marked folder are nbzoo's and may be removed; outside one they are left alone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from nbzoo import paths

MARKER = ".nbzoo-owned"
_NOTE = (
    "nbzoo wrote this folder. It replaces or deletes only the files listed here, and only while "
    "they are unchanged (same size and modification time); anything else in it is left alone."
)
_SCRATCH_NOTE = (
    "nbzoo's own scratch folder (build/): nbzoo made it, and everything in it is nbzoo's to "
    "replace or delete. Keep nothing of yours here."
)
_TEMPORARY = re.compile(r"\..*\.nbzoo-tmp-(\d+)-[0-9a-f]+(\..*)?")


class NotOursError(RuntimeError):
    """A write that would touch something nbzoo did not write; the message is one line naming the
    file and saying what to do instead."""


# --- the marker ------------------------------------------------------------------------------


def _stat(path: Path) -> list[int]:
    st = os.lstat(path)
    return [st.st_size, st.st_mtime_ns]


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker of ``folder`` (``{"written_by", "files": {rel: [size, mtime_ns]}, "beside"}``),
    or None where it has none. A marker that is not nbzoo's JSON lists nothing."""
    path = Path(folder) / MARKER
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"written_by": "?", "files": {}, "beside": {}}
    if not isinstance(data, dict):
        return {"written_by": "?", "files": {}, "beside": {}}
    files = data.get("files") if isinstance(data.get("files"), dict) else {}
    beside = data.get("beside") if isinstance(data.get("beside"), dict) else {}
    return {**data, "files": files, "beside": beside, "scratch": data.get("scratch") is True}


def _write_marker(folder: Path, marker: Mapping) -> None:
    data = {
        "written_by": marker.get("written_by", "nbzoo"),
        "note": _SCRATCH_NOTE if marker.get("scratch") else _NOTE,
        "files": dict(sorted(marker.get("files", {}).items())),
        "beside": dict(sorted(marker.get("beside", {}).items())),
    }
    if marker.get("scratch"):
        data["scratch"] = True
    tmp = folder / f".{MARKER}.nbzoo-tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(tmp, folder / MARKER)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Serialise marker updates of ``folder`` between processes (a lock on the folder itself, so
    no lock file is left in it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _update(folder: Path, writer: str, change: Callable[[dict], None]) -> None:
    with _locked(folder):
        marker = read_marker(folder) or {"written_by": writer, "files": {}, "beside": {}}
        change(marker)
        _write_marker(folder, marker)


def is_marked(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MARKER).is_file()


# --- what is nbzoo's -------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers: a write of this process that failed
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _dead_temporary(name: str) -> bool:
    m = _TEMPORARY.fullmatch(name)
    return m is not None and not _pid_alive(int(m.group(1)))


def foreign_files(folder: str | os.PathLike, limit: int | None = None) -> list[str]:
    """The files under ``folder`` (paths relative to it) that are not nbzoo's: not listed,
    unchanged, in the marker of the nearest marked folder at or above them."""
    base = Path(folder).resolve()
    found: list[str] = []

    def walk(current: Path, owner: Path | None, listed: Mapping | None) -> bool:
        marker = read_marker(current)
        if marker is not None and marker["scratch"]:
            return True  # nbzoo's scratch folder: everything in it is nbzoo's
        if marker is not None:
            owner, listed = current, marker["files"]
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except (NotADirectoryError, FileNotFoundError):
            entries = []
        for entry in entries:
            path = Path(entry.path)
            if current == owner and entry.name == MARKER:
                continue
            if listed is not None and _dead_temporary(entry.name):
                continue
            if entry.is_dir(follow_symlinks=False):
                if not walk(path, owner, listed):
                    return False
                continue
            ours = listed is not None and listed.get(path.relative_to(owner).as_posix()) == _stat(
                path
            )
            if not ours:
                found.append(path.relative_to(base).as_posix())
                if limit is not None and len(found) >= limit:
                    return False
        return True

    owner, listed = None, None
    for parent in base.parents:  # a folder inside a marked one is judged by that marker
        marker = read_marker(parent)
        if marker is not None and marker["scratch"]:
            return found
        if marker is not None:
            owner, listed = parent, marker["files"]
            break
    walk(base, owner, listed)
    return found


def _is_ours_file(path: Path) -> bool:
    """``path`` (a file) is listed, unchanged, in the marker of the nearest marked folder above."""
    path = path.parent.resolve() / path.name
    for owner in path.parents:
        marker = read_marker(owner)
        if marker is not None:
            return marker["scratch"] or (
                marker["files"].get(path.relative_to(owner).as_posix()) == _stat(path)
            )
    return False


def owns(path: str | os.PathLike) -> bool:
    """``path`` is a file nbzoo wrote and nobody changed since (listed in a marker above it)."""
    path = Path(path)
    return (path.is_file() or path.is_symlink()) and _is_ours_file(path)


def _refusal(folder: Path, foreign: list[str], writer: str, what: str, hint: str) -> str:
    name = f"{what} {paths.shown(folder)}" if what else paths.shown(folder)
    foreign = sorted(foreign, key=lambda rel: (rel.count("/"), rel))  # the nearest first
    more = f" (and {len(foreign) - 3} more)" if len(foreign) > 3 else ""
    return (
        f"{name} holds {', '.join(foreign[:3])}{more} that nbzoo did not write; {writer} writes "
        "only into a "
        f"folder it created or marked ({MARKER})" + (f": {hint}" if hint else "")
    )


# --- claiming a folder -----------------------------------------------------------------------


def check_claim(
    folder: str | os.PathLike,
    writer: str,
    *,
    what: str = "",
    hint: str = "name an empty or new folder, or move this one away",
    adopt: Callable[[Path], bool] | None = None,
) -> bool:
    """Raise :class:`NotOursError` where :func:`claim` would refuse ``folder``, before anything
    is written (a writer of several folders asks about all of them first). True when the folder
    is an unmarked one that ``adopt`` accepts."""
    folder = Path(folder)
    named = f"{what} {paths.shown(folder)}" if what else paths.shown(folder)
    if folder.is_symlink() and not folder.exists():
        raise NotOursError(f"{named} is a broken link; {writer} needs a folder there")
    if folder.exists() and not folder.is_dir():
        raise NotOursError(f"{named} is a file, not a folder; {writer} needs a folder there")
    if not folder.exists() or is_marked(folder):
        return False
    foreign = foreign_files(folder)
    if not foreign:  # empty, only marked folders, or listed by the marker of a folder above
        return False
    if adopt is not None and adopt(folder):
        return True
    raise NotOursError(_refusal(folder, foreign, writer, what, hint))


def claim_scratch(folder: str | os.PathLike, writer: str, *, empty: bool = False) -> Owned:
    """Make ``folder`` a scratch folder of nbzoo's (under build/), where everything is nbzoo's
    to replace or delete: created and marked so, or taken as it is when it is one already
    (``empty``: emptied first). An existing folder that is not nbzoo's is refused, as by
    :func:`claim`; an empty one is marked."""
    folder = Path(folder)
    marker = read_marker(folder) if folder.is_dir() else None
    if marker is None or not marker["scratch"]:
        check_claim(folder, writer, hint="move it away: nbzoo keeps its scratch files there")
        if folder.exists() and foreign_files(folder) == []:
            remove_folder(folder, writer)  # empty, or only nbzoo's: made anew as scratch
        marker = None
    elif empty:
        shutil.rmtree(folder)
        marker = None
    if marker is None:
        folder.mkdir(parents=True, exist_ok=True)
        _write_marker(folder, {"written_by": writer, "scratch": True})
    return Owned(folder, writer)


def claim(
    folder: str | os.PathLike,
    writer: str,
    *,
    what: str = "",
    hint: str = "name an empty or new folder, or move this one away",
    adopt: Callable[[Path], bool] | None = None,
) -> Owned:
    """Make ``folder`` nbzoo's to write (see the module docstring) and return it as :class:`Owned`.

    ``writer`` names what writes (it goes into the marker and the refusal); ``what`` and ``hint``
    phrase the refusal (``what="data_dir"``, ``hint="pass data_source=local to read it"``).
    ``adopt(folder)`` is asked about an unmarked folder with files in it: True when every file is
    exactly what this writer writes (a folder an nbzoo without markers wrote)."""
    folder = Path(folder)
    adopted = check_claim(folder, writer, what=what, hint=hint, adopt=adopt)
    folder.mkdir(parents=True, exist_ok=True)  # exist_ok: the ranks of a torchrun job race here
    if is_marked(folder):
        return Owned(folder, writer)
    if adopted:
        files = {
            p.relative_to(folder).as_posix(): _stat(p)
            for p in sorted(folder.rglob("*"))
            if not p.is_dir() or p.is_symlink()
        }
        _write_marker(folder, {"written_by": f"{writer} (adopted: byte-identical)", "files": files})
    else:
        _mark_inside(folder, writer)
    return Owned(folder, writer)


def _mark_inside(folder: Path, writer: str) -> None:
    """Mark ``folder``, moving what a marked folder above lists of it into its own marker."""
    base = folder.resolve()
    above = next((p for p in base.parents if is_marked(p)), None)
    files: dict = {}
    if above is not None:
        prefix = base.relative_to(above).as_posix() + "/"
        listed = read_marker(above)["files"]
        files = {k[len(prefix) :]: v for k, v in listed.items() if k.startswith(prefix)}
    _write_marker(folder, {"written_by": writer, "files": files})
    if files:

        def drop(marker: dict) -> None:
            marker["files"] = {k: v for k, v in marker["files"].items() if not k.startswith(prefix)}

        _update(above, writer, drop)


def holds_only(folder: Path, expected: Mapping[str, bytes | Callable[[Path], bool] | None]) -> bool:
    """True when every file under ``folder`` is one of ``expected`` (relative paths) with exactly
    those bytes (a callable: passing that test, e.g. a published sha256; None: any content, for a
    log that names times and places): the ``adopt`` test of a generator. Fewer files than
    ``expected`` is fine; another file, or other bytes, is not."""
    for path in folder.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            continue
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink() or rel not in expected:
            return False
        want = expected[rel]
        if callable(want):
            if not want(path):
                return False
        elif want is not None and path.read_bytes() != want:
            return False
    return True


def built_alike(folder: Path, build: Callable[[Path], object], loose: tuple[str, ...] = ()) -> bool:
    """True when ``folder`` holds only what ``build(scratch)`` writes into a new scratch folder,
    byte for byte (files named in ``loose`` by their presence only): :func:`holds_only` for a
    writer that cannot say its bytes without writing them."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="nbzoo-adopt-") as scratch:
        made = Path(scratch) / folder.name
        build(made)
        expected = {
            p.relative_to(made).as_posix(): None if p.name in loose else p.read_bytes()
            for p in made.rglob("*")
            if p.is_file() and p.name != MARKER
        }
    return holds_only(folder, expected)


def _temporary_beside(path: Path) -> Path:
    return path.with_name(
        f".{path.stem}.nbzoo-tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}"
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class Owned:
    """A folder nbzoo may write (made by :func:`claim`); paths are relative to it."""

    def __init__(self, root: Path, writer: str):
        self.root = Path(root)
        self.writer = writer

    def __repr__(self) -> str:
        return f"Owned({str(self.root)!r}, {self.writer!r})"

    def path(self, rel: str | os.PathLike) -> Path:
        path = self.root / rel
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise ValueError(f"{rel}: outside {self.root}")
        return path

    def _rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def check(self, rel: str | os.PathLike) -> None:
        """Raise :class:`NotOursError` unless ``rel`` is absent or nbzoo's (a file listed
        unchanged; a folder all of whose files are)."""
        path = self.path(rel)
        for parent in reversed(path.relative_to(self.root).parents[:-1]):
            if (self.root / parent).exists() and not (self.root / parent).is_dir():
                raise NotOursError(
                    f"{paths.shown(self.root / parent)} is a file nbzoo did not write where "
                    f"{self.writer} needs a folder; move it away"
                )
        if not path.exists() and not path.is_symlink():
            return
        if path.is_dir() and not path.is_symlink():
            foreign = foreign_files(path)
            if foreign:
                raise NotOursError(
                    _refusal(path, foreign, self.writer, "", "move it away or delete it")
                )
        elif not _is_ours_file(path):
            raise NotOursError(
                f"{paths.shown(path)} exists and nbzoo did not write it (or it was changed "
                f"since); {self.writer} replaces only its own files: move it away"
            )

    def _forget(self, marker: dict, rel: str) -> None:
        marker["files"] = {
            k: v for k, v in marker["files"].items() if k != rel and not k.startswith(rel + "/")
        }

    def _install(self, tmp: Path, path: Path) -> None:
        """Record ``tmp`` (a finished file or folder) under ``path`` and rename it there. The stat
        recorded before the rename is the file's after it: a rename keeps size and mtime."""
        rel = self._rel(path)
        if tmp.is_dir() and not tmp.is_symlink():
            stats = {
                f"{rel}/{p.relative_to(tmp).as_posix()}": _stat(p)
                for p in tmp.rglob("*")
                if not p.is_dir() or p.is_symlink()
            }
        else:
            stats = {rel: _stat(tmp)}

        def change(marker: dict) -> None:
            self._forget(marker, rel)
            marker["files"].update(stats)

        self.check(rel)
        old = None
        if path.is_dir() and not path.is_symlink():
            old = path.with_name(f".{path.name}.nbzoo-tmp-{os.getpid()}-{secrets.token_hex(4)}")
            path.rename(old)
        try:
            _update(self.root, self.writer, change)
            os.replace(tmp, path)
        except BaseException:
            if old is not None:  # the earlier folder back in its place
                old.rename(path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def write_bytes(self, rel: str | os.PathLike, data: bytes) -> Path:
        with self.file(rel) as tmp:
            tmp.write_bytes(data)
        return self.path(rel)

    def write_text(self, rel: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
        return self.write_bytes(rel, text.encode(encoding))

    @contextlib.contextmanager
    def file(self, rel: str | os.PathLike) -> Iterator[Path]:
        """A temporary path (same suffix) to write ``rel``'s content to; renamed over ``rel``
        when the block ends without an exception, removed when it raises."""
        path = self.path(rel)
        self.check(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temporary_beside(path)
        try:
            yield tmp
            self._install(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @contextlib.contextmanager
    def folder(self, rel: str | os.PathLike) -> Iterator[Path]:
        """A temporary folder to build ``rel`` in; swapped in whole for ``rel`` (which must be
        absent or nbzoo's) when the block ends without an exception, removed when it raises."""
        path = self.path(rel)
        self.check(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.nbzoo-tmp-{os.getpid()}-{secrets.token_hex(4)}")
        tmp.mkdir()
        try:
            yield tmp
            self._install(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    @contextlib.contextmanager
    def staged(self) -> Iterator[Path]:
        """A temporary folder inside this one; when the block ends without an exception every
        file written into it is moved to the same place here (each replacing only what is
        nbzoo's), e.g. for ``save_pretrained``, which writes several files into a folder."""
        tmp = self.root / f".staged.nbzoo-tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            yield tmp
            produced = sorted(p for p in tmp.rglob("*") if not p.is_dir() or p.is_symlink())
            for p in produced:
                self.check(p.relative_to(tmp))
            for p in produced:
                self.install(p.relative_to(tmp), p)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def clean_dead_temporaries(self) -> None:
        """Remove the temporary files and folders that writers which died left here."""
        for entry in self.root.iterdir():
            if _dead_temporary(entry.name) and entry.name != MARKER:
                _remove(entry)

    def install(self, rel: str | os.PathLike, produced: str | os.PathLike) -> Path:
        """Move a finished file or folder written elsewhere in this folder (a download's
        ``.part``) to ``rel``, replacing only what is nbzoo's."""
        path = self.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._install(Path(produced), path)
        return path

    def rename(self, src: str | os.PathLike, dst: str | os.PathLike) -> Path:
        """Move nbzoo's ``src`` to ``dst`` (absent or nbzoo's, replaced) inside this folder."""
        source, target = self.path(src), self.path(dst)
        self.check(src)
        self.check(dst)
        srel, trel = self._rel(source), self._rel(target)

        def change(marker: dict) -> None:
            self._forget(marker, trel)
            moved = {}
            for k, v in list(marker["files"].items()):
                if k == srel or k.startswith(srel + "/"):
                    moved[trel + k[len(srel) :]] = v
                    del marker["files"][k]
            marker["files"].update(moved)

        if target.exists() or target.is_symlink():
            self.remove(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        _update(self.root, self.writer, change)
        source.rename(target)
        return target

    def move_aside(self, src: str | os.PathLike, dst: str | os.PathLike) -> Path:
        """Rename ``src`` to the new name ``dst`` inside this folder, whatever became of its
        files (a damaged checkpoint set aside): nothing is replaced or deleted, so nothing needs
        to be nbzoo's; what the marker lists of ``src`` moves with it."""
        source, target = self.path(src), self.path(dst)
        if target.exists() or target.is_symlink():
            raise FileExistsError(errno.EEXIST, "exists", str(target))
        srel, trel = self._rel(source), self._rel(target)

        def change(marker: dict) -> None:
            for k in [k for k in marker["files"] if k == srel or k.startswith(srel + "/")]:
                marker["files"][trel + k[len(srel) :]] = marker["files"].pop(k)

        source.rename(target)
        _update(self.root, self.writer, change)
        return target

    def remove(self, rel: str | os.PathLike) -> None:
        """Delete ``rel`` when it is nbzoo's (see :meth:`check`); nothing when it is absent."""
        path = self.path(rel)
        if not path.exists() and not path.is_symlink():
            return
        self.check(rel)
        _remove(path)
        _update(self.root, self.writer, lambda marker: self._forget(marker, self._rel(path)))


# --- a folder made whole, and the files beside it ---------------------------------------------


def check_replaceable(
    final: str | os.PathLike,
    writer: str,
    *,
    what: str = "",
    hint: str = "",
    beside=(),
    adopt: Callable[[Path], bool] | None = None,
) -> None:
    """Raise :class:`NotOursError` unless ``final`` can be (re)made by :func:`new_folder`: absent,
    empty, marked with every file in it nbzoo's, or unmarked and accepted by ``adopt``; and each
    name of ``beside`` (files next to it, e.g. ais_bench's ``<name>_summary.json``) absent or
    listed in its marker."""
    final = Path(final)
    hint = hint or "choose another name or move it away"
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        raise NotOursError(
            f"{(what + ' ') if what else ''}{paths.shown(final)} exists and is not a folder; "
            f"{writer} writes a folder there: {hint}"
        )
    marker = read_marker(final) if final.is_dir() else None
    if final.is_dir():
        foreign = foreign_files(final)
        if foreign and not (marker is None and adopt is not None and adopt(final)):
            raise NotOursError(_refusal(final, foreign, writer, what, hint))
    for name in beside:
        path = final.parent / name
        if not path.exists() and not path.is_symlink():
            continue
        listed = (marker or {}).get("beside", {}).get(name)
        if path.is_symlink() or listed != _stat(path):
            raise NotOursError(
                f"{paths.shown(path)} exists and nbzoo did not write it (or it was changed "
                f"since); {writer} writes that file beside {final.name}: {hint}"
            )


@contextlib.contextmanager
def new_folder(
    final: str | os.PathLike,
    writer: str,
    *,
    what: str = "",
    hint: str = "",
    beside=(),
    adopt: Callable[[Path], bool] | None = None,
) -> Iterator[Path]:
    """Build the folder ``final`` in a temporary folder beside it; when the block ends without an
    exception, mark it and swap it in for ``final`` (see :func:`check_replaceable`, asked before
    and again after). An exception removes the temporary folder and leaves ``final`` as it was."""
    final = Path(final)
    check_replaceable(final, writer, what=what, hint=hint, beside=beside, adopt=adopt)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.nbzoo-tmp-{os.getpid()}-{secrets.token_hex(4)}")
    old = final.with_name(f".{final.name}.nbzoo-tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        yield tmp
        files = {
            p.relative_to(tmp).as_posix(): _stat(p)
            for p in tmp.rglob("*")
            if not p.is_dir() or p.is_symlink()
        }
        previous = read_marker(final) if final.is_dir() else None
        kept = {k: v for k, v in (previous or {}).get("beside", {}).items()}
        _write_marker(tmp, {"written_by": writer, "files": files, "beside": kept})
        check_replaceable(final, writer, what=what, hint=hint, beside=beside, adopt=adopt)
        if final.exists():
            final.rename(old)
        try:
            tmp.rename(final)
        except BaseException:
            if old.exists():  # the earlier folder back in its place
                old.rename(final)
            raise
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def write_beside(final: str | os.PathLike, name: str, data: bytes, writer: str) -> Path:
    """Write the file ``name`` next to nbzoo's folder ``final`` (through a temporary name) and
    list it in ``final``'s marker, so that a later run may replace it and nothing else."""
    final = Path(final)
    check_replaceable(final, writer, beside=(name,))
    path = final.parent / name
    tmp = _temporary_beside(path)
    try:
        tmp.write_bytes(data)
        stat = _stat(tmp)
        _update(final, writer, lambda marker: marker["beside"].__setitem__(name, stat))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_output_file(
    path: str | os.PathLike,
    data: bytes,
    writer: str,
    *,
    recognise: Callable[[Path], bool] | None = None,
    hint: str = "move it away or name another output folder",
) -> Path:
    """Write one output file into an output folder (a results folder the user or the project
    names): a missing folder is created and marked; in an existing one the file is added,
    through a temporary name, and replaces a file of that name only when nbzoo wrote it --
    listed in a marker, or shown to be nbzoo's own output by ``recognise`` (a results record
    that names its notebook). Anything else there is refused and left as it is."""
    path = Path(path)
    if not path.parent.exists():
        claim(path.parent, writer)
    if path.exists() or path.is_symlink():
        if path.is_dir() or not (owns(path) or (recognise is not None and recognise(path))):
            raise NotOursError(
                f"{paths.shown(path)} exists and nbzoo did not write it (or it was changed "
                f"since); {writer} replaces only its own files: {hint}"
            )
    tmp = _temporary_beside(path)
    try:
        tmp.write_bytes(data)
        here = path.parent.resolve()
        marked = next((p for p in (here, *here.parents) if is_marked(p)), None)
        if marked is not None:  # listed, so that a later run may replace it
            rel = (here / path.name).relative_to(marked).as_posix()
            stat = _stat(tmp)
            _update(marked, writer, lambda marker: marker["files"].__setitem__(rel, stat))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def remove_folder(folder: str | os.PathLike, writer: str, *, hint: str = "") -> None:
    """Delete ``folder`` when every file in it is nbzoo's; refuse otherwise; nothing if absent."""
    folder = Path(folder)
    if not folder.exists() and not folder.is_symlink():
        return
    check_replaceable(folder, writer, hint=hint or "move the files you want to keep away first")
    _remove(folder)


def write_error(path: str | os.PathLike, exc: BaseException) -> str:
    """One line for a write that failed on the disk (full, read-only, too large a file)."""
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    if getattr(exc, "errno", None) == errno.ENOSPC:
        reason = "no space left on the device"
    return f"cannot write {paths.shown(path)}: {reason}"
