"""Atomic file writes for everything that holds a user's work (manifests, journals, models).

A crash or a kill at any moment leaves either the old file or the new one, never half of one:
write to a temporary file in the same folder, flush and fsync it, then `os.replace` it over the
target (atomic on POSIX and Windows when both are on one file system).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from .errors import InputError


def csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], ignore_extra: bool = False) -> str:
    """CSV text ("\\n" line ends) of `rows` with a header of `columns`; floats as repr, so they read
    back exactly. A key outside `columns` is an error unless `ignore_extra`."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore" if ignore_extra else "raise")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def ensure_folder(folder: str | os.PathLike, is_file_message: str, what: str = "output folder",
                  advice: str = "choose a writable folder") -> Path:
    """Create `folder` (and its parents) unless it exists; one-line InputError when it is a file
    (`is_file_message`) or cannot be created ("Cannot create the <what> <folder> (<reason>); <advice>.")."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(is_file_message)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"Cannot create the {what} {folder} ({error.strerror}); {advice}.") from None
    return folder


def check_writable_folder(folder: str | os.PathLike, option: str = "--out", what: str = "output folder") -> Path:
    """Refuse, in one line and before any work, an output folder that could not be written: a file in
    its place or in its path, or no right to create files (a read-only mount, permissions). Probes the
    folder, or the nearest folder above it that exists, with a temporary file; creates nothing, so a
    run refused later for its input leaves no empty folder behind. Returns `folder` as a Path."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = f"{option} {folder} is a file" if existing == folder else f"{option} {folder} lies in {existing}, which is a file"
        raise InputError(f"{where}, not a folder; give {option} a folder for the outputs.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        verb = "write into" if existing == folder else "create"
        raise InputError(f"Cannot {verb} the {what} {folder} ({error.strerror} in {existing}); give {option} a writable folder.") from None
    return folder


def check_writable_file(path: str | os.PathLike, option: str = "--out", example: str = "model.pt") -> Path:
    """The folder of the output file `path` exists (created if needed) and is writable, and `path`
    is not a folder. Called before long work (training) so that its result is never lost."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder; give a file name such as {path / example}.")
    if path.parent.exists() and not path.parent.is_dir():
        raise InputError(f"{option} {path} lies in {path.parent}, which is a file, not a folder; give a path inside a folder.")
    check_writable_folder(path.parent, option, what="folder of the output file")
    return path


_UNSAFE_NAME_CHARACTERS = re.compile(r"[/\\\x00-\x1f\x7f]")


def name_problem(name: str) -> str | None:
    """Why `name` (a case id, a file name from a table) cannot be one file or folder name inside an
    output folder, or None when it can: a path separator, a control character, a leading dot ('.',
    '..', hidden names and the staging prefix) or nothing but spaces."""
    if not isinstance(name, str) or not name.strip():
        return "it is empty"
    if _UNSAFE_NAME_CHARACTERS.search(name):
        return "it holds a path separator or a control character"
    if name.startswith("."):
        return "it starts with a dot"
    return None


def safe_file_name(text: str, replacement: str = "_", fallback: str = "case") -> str:
    """`text` reduced to letters, digits, '.', '_' and '-' (any other run becomes `replacement`),
    without leading or trailing dots or replacements: one safe name, never a path."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", replacement, str(text)).strip("." + replacement)
    return cleaned or fallback


def path_inside(folder: str | os.PathLike, name: str) -> Path:
    """`folder / name`, refused (InputError) unless `name` is one safe name (`name_problem`): then the
    path is a direct child of `folder`. Write there only through `replace_folder` or `os.replace`,
    which replace a symbolic link found at that name instead of writing through it."""
    problem = name_problem(name)
    if problem is not None:
        raise InputError(f"The name {name!r} cannot be used for an output in {folder} ({problem}); rename it, e.g. {safe_file_name(name)!r}.")
    return Path(folder) / name


# --------------------------------------------------------------------------------------------
# staging folders: outputs are built in `.staging-<pid>-*` and moved into place once complete

STAGING_PREFIX = ".staging-"


def staging_folder(parent: str | os.PathLike) -> Path:
    """A new hidden folder in `parent` named after this process, so that a later run can tell a
    kill's leftover (its process is gone) from a live run's folder (`remove_stale_staging`)."""
    return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=parent))


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return False
    return True


def remove_stale_staging(folder: str | os.PathLike, depth: int = 2) -> list[Path]:
    """Remove the staging folders that runs whose process no longer exists (killed, crashed) left in
    `folder` and its sub-folders (`depth` levels; symbolic links are not followed); returns them."""
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir()) if folder.is_dir() else []
    except OSError:
        return removed
    for entry in entries:
        if entry.is_symlink() or not entry.is_dir():
            continue
        if entry.name.startswith(STAGING_PREFIX):
            pid_text = entry.name[len(STAGING_PREFIX):].split("-", 1)[0]
            if not pid_text.isdigit() or not _process_alive(int(pid_text)):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
        elif depth > 1:
            removed += remove_stale_staging(entry, depth - 1)
    return removed


def replace_folder(staging: Path, target: Path) -> None:
    """Put the finished folder `staging` at its sibling `target`, replacing whatever was there (an
    old run's folder, a file, a symbolic link: replaced, never followed), so new outputs replace the
    old ones as a whole. The old entry is first renamed to a staging name: a kill in between leaves
    a leftover that the next run removes, never a mixture of two runs."""
    old = None
    if target.is_symlink() or target.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-old-", dir=target.parent))
        os.rmdir(old)
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


@contextmanager
def atomic_path(target: str | os.PathLike, same_name: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success move it over `target` atomically.

    For writers that need a file name (SimpleITK, torch.jit.save). On error the temporary file is
    removed and `target` is left untouched. With `same_name` the temporary file has `target`'s own
    name, inside a hidden temporary folder beside it: for writers that record the file name in the
    file (torch.jit.save names the archive's top folder after it).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = None
    if same_name:
        folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        tmp = folder / target.name
        tmp.touch()
    else:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp" + "".join(target.suffixes), dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
    # mkstemp makes the file owner-only (0600); give it the permissions a normal write would have.
    os.chmod(tmp, 0o666 & ~_current_umask())
    try:
        yield tmp
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as out:
            out.write(data)
            out.flush()


def atomic_write_text(target: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    # The rename itself is only durable once the directory entry is flushed (POSIX only).
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
