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
