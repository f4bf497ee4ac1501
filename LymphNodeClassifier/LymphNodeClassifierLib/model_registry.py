"""The user's model folder: trained models, the bundled ones, and which model is active.

- Folder: `models_folder(folder)` is `folder` when given, else the environment variable
  `LYMPHNODECLASSIFIER_MODELS`, else the platform's per-user data folder
  (`~/.local/share/LymphNodeClassifier/models` or `$XDG_DATA_HOME/...` on Linux,
  `~/Library/Application Support/LymphNodeClassifier/models` on macOS,
  `%LOCALAPPDATA%\\LymphNodeClassifier\\models` on Windows). It holds exported TorchScript
  models (`*.pt`, each with its model card), the training jobs' `<job>.metrics.json` and
  `active_model.json`.
- `list_models(folder, bundled_dir)`: one `ModelEntry` per model file of the folder and of the
  extension's `Resources/Models` (bundled first, then the user's models, newest first). The card is
  read with `model.read_card` (no weights loaded); a file that is not a readable model is listed
  with its `error` instead of raising. Hidden files (names starting with '.', e.g. the temporary
  files of an atomic write or of a training job still running) are never listed.
- `active_model(folder)` / `set_active_model(folder, path)`: `active_model.json` holds the active
  model's path (relative to the folder when the model lies inside it, so the folder can move),
  written atomically (`fileio.atomic_write_json`). A missing, unreadable or dangling file means
  "no active model" (None), never an exception.
- `install_model(folder, path, make_active)`: copies (or moves) a model file into the folder under
  a name no other file has, atomically: the bytes go to a hidden temporary file first, which is
  then hard-linked to the final name (a link never replaces an existing file) or, where the file
  system has no hard links, renamed.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import InputError
from .fileio import atomic_write_json, ensure_folder, safe_file_name

ENV_VAR = "LYMPHNODECLASSIFIER_MODELS"
APP_NAME = "LymphNodeClassifier"
ACTIVE_FILE = "active_model.json"
MODEL_SUFFIX = ".pt"
BUNDLED_MODELS_DIR = Path(__file__).resolve().parents[1] / "Resources" / "Models"


# --------------------------------------------------------------------------------------------
# the folder


def default_models_folder() -> Path:
    """The per-user model folder: the environment variable, else the platform's user data folder."""
    override = os.environ.get(ENV_VAR, "").strip()
    if override:
        return Path(override).expanduser()
    home = Path.home()
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("LOCALAPPDATA") or os.environ.get("APPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    return base / APP_NAME / "models"


def models_folder(folder: str | os.PathLike | None = None) -> Path:
    """`folder` if given, else `default_models_folder()`; not created here."""
    return Path(folder).expanduser() if folder not in (None, "") else default_models_folder()


def _ensure_folder(folder: Path) -> Path:
    return ensure_folder(folder, f"The model folder {folder} is a file; choose a folder (or set {ENV_VAR}).",
                         what="model folder", advice=f"choose a writable folder (or set {ENV_VAR})")


# --------------------------------------------------------------------------------------------
# listing


@dataclass
class ModelEntry:
    """One model file: what its card says, or why it could not be read."""

    path: Path
    name: str
    created: str = ""
    metrics: dict = field(default_factory=dict)  # the card's "metrics" (validation, test, held_out)
    source: str = "user"  # "user" or "bundled"
    active: bool = False
    error: str | None = None  # set when the file is not a readable model
    card: dict | None = None
    modified: float = 0.0  # file modification time (seconds since the epoch)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def test_auc(self) -> float | None:
        test = self.metrics.get("test") or {}
        value = test.get("auc") if isinstance(test, dict) else None
        return float(value) if isinstance(value, (int, float)) else None

    def label(self) -> str:
        """One line for a model chooser: name, date, test AUC, and the state."""
        if self.error:
            return f"{self.path.name} (unreadable)"
        parts = [self.name or self.path.stem]
        if self.created:
            parts.append(self.created[:10])
        if self.test_auc is not None:
            parts.append(f"test AUC {self.test_auc:.3f}")
        text = ", ".join(parts)
        if self.source == "bundled":
            text += " [bundled]"
        if self.active:
            text += " (active)"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path), "name": self.name, "created": self.created, "metrics": self.metrics,
            "source": self.source, "active": self.active, "error": self.error,
        }


def _model_files(directory: Path | None) -> list[Path]:
    if directory is None or not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if p.suffix == MODEL_SUFFIX and not p.name.startswith(".") and p.is_file()]


NO_INTENDED_USE = "This model's card does not say what it is for; treat its output as unvalidated."


def intended_use_text(card: dict | None) -> str:
    """The card's statement of what the model is for (`intended_use`, else its description), after its
    name: shown next to the panel's model chooser and in the report footer."""
    if not card:
        return NO_INTENDED_USE
    text = str(card.get("intended_use") or card.get("description") or "").strip() or NO_INTENDED_USE
    name = str(card.get("name") or "").strip()
    return f"{name}: {text}" if name else text


def read_entry(path: str | os.PathLike, source: str = "user") -> ModelEntry:
    """A `ModelEntry` for one file; a file that is not a model gets `error` (one sentence)."""
    path = Path(path)
    try:
        modified = path.stat().st_mtime
    except OSError:
        modified = 0.0
    try:
        from .model import read_card  # imports torch, which Slicer may not have yet: then every entry says so

        card = read_card(path)
    except InputError as error:
        return ModelEntry(path=path, name=path.stem, source=source, error=str(error), modified=modified)
    except Exception as error:  # noqa: BLE001 - a broken file must not break the list
        return ModelEntry(path=path, name=path.stem, source=source, error=f"{type(error).__name__}: {error}", modified=modified)
    return ModelEntry(
        path=path, name=str(card.get("name") or path.stem), created=str(card.get("created") or ""),
        metrics=dict(card.get("metrics") or {}), source=source, card=card, modified=modified,
    )


def list_models(folder: str | os.PathLike | None = None, bundled_dir: str | os.PathLike | None = BUNDLED_MODELS_DIR) -> list[ModelEntry]:
    """The bundled models (by name), then the user's models (newest first), active one marked.

    A missing folder or bundled folder is just empty. `bundled_dir=None` leaves the bundled models out.
    """
    folder = models_folder(folder)
    active = active_model(folder)
    entries = [read_entry(p, "bundled") for p in sorted(_model_files(Path(bundled_dir) if bundled_dir else None))]
    user = [read_entry(p, "user") for p in _model_files(folder)]
    entries += sorted(user, key=lambda e: (-e.modified, e.path.name))
    if active is not None:
        for entry in entries:
            entry.active = _same_file(entry.path, active)
    return entries


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(os.path.abspath(a)) == Path(os.path.abspath(b))


# --------------------------------------------------------------------------------------------
# the active model


def active_model(folder: str | os.PathLike | None = None) -> Path | None:
    """The active model's path, or None (no file, unreadable file, or the model is gone)."""
    folder = models_folder(folder)
    try:
        data = json.loads((folder / ACTIVE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    stored = data.get("path") if isinstance(data, dict) else None
    if not isinstance(stored, str) or not stored:
        return None
    path = Path(stored)
    if not path.is_absolute():
        path = folder / path
    return path if path.is_file() else None


def set_active_model(folder: str | os.PathLike | None, path: str | os.PathLike | None) -> Path | None:
    """Make `path` (a readable model file) the active model; None clears the choice.

    Returns the active path. The file is checked with `model.read_card` first (InputError).
    """
    folder = _ensure_folder(models_folder(folder))
    if path is None:
        atomic_write_json(folder / ACTIVE_FILE, {"path": None, "set": _now()})
        return None
    from .model import read_card

    path = Path(path).expanduser()
    read_card(path)  # InputError: missing or not a model
    resolved = path.resolve()
    try:
        stored = resolved.relative_to(folder.resolve()).as_posix()
    except ValueError:
        stored = str(resolved)
    atomic_write_json(folder / ACTIVE_FILE, {"path": stored, "set": _now()})
    return resolved


def resolve_model(folder: str | os.PathLike | None = None, bundled_dir: str | os.PathLike | None = BUNDLED_MODELS_DIR,
                  default_name: str = "lymph_node_phantom.pt") -> Path | None:
    """The model to use when none is chosen: the active one, else the bundled default, else None.

    Other bundled models (e.g. for another kind of lesion) are never picked by default: they are
    used only when chosen or made active.
    """
    active = active_model(folder)
    if active is not None:
        return active
    if bundled_dir:
        default = Path(bundled_dir) / default_name
        if default.is_file():
            return default
    return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# installing


def safe_name(name: str) -> str:
    """`name` with every character other than letters, digits, '.', '_' and '-' replaced by '-'."""
    return safe_file_name(name, replacement="-", fallback="model")


def unique_model_path(folder: str | os.PathLike, stem: str) -> Path:
    """`folder/<stem>.pt`, or `<stem>-2.pt`, `<stem>-3.pt`, ... whichever does not exist yet."""
    folder = Path(folder)
    stem = safe_name(stem)
    candidate = folder / f"{stem}{MODEL_SUFFIX}"
    number = 2
    while candidate.exists():
        candidate = folder / f"{stem}-{number}{MODEL_SUFFIX}"
        number += 1
    return candidate


def _place(temporary: Path, folder: Path, stem: str) -> Path:
    """Give `temporary` (a hidden file in `folder`) a unique visible name without replacing anything."""
    for _ in range(1000):
        target = unique_model_path(folder, stem)
        try:
            os.link(temporary, target)  # fails if `target` appeared meanwhile: nothing is overwritten
        except FileExistsError:
            continue
        except OSError:  # no hard links on this file system: rename (target checked just above)
            os.replace(temporary, target)
            return target
        temporary.unlink()
        return target
    raise InputError(f"Could not find a free file name for the model in {folder}; tidy the folder.")


def install_model(
    folder: str | os.PathLike | None,
    new_model_path: str | os.PathLike,
    make_active: bool = False,
    name: str | None = None,
    move: bool = False,
) -> Path:
    """Copy (or, with `move`, move) a model file into the model folder under a unique name.

    The file must be a readable model (`model.read_card`, InputError otherwise). The name is
    `name` (default: the file's own stem) made safe, with `-2`, `-3`, ... added when taken.
    Atomic: the folder only ever shows the complete file. Returns the installed path.
    """
    from .model import read_card

    folder = _ensure_folder(models_folder(folder))
    source = Path(new_model_path)
    read_card(source)  # InputError: missing or not a model
    stem = name if name else source.stem
    fd, tmp_name = tempfile.mkstemp(prefix=f".{safe_name(stem)}.", suffix=".installing", dir=folder)
    os.close(fd)
    temporary = Path(tmp_name)
    try:
        moved = False
        if move:
            try:
                os.replace(source, temporary)
                moved = True
            except OSError:  # another file system: copy, and remove the source once placed
                pass
        if not moved:
            shutil.copyfile(source, temporary)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(temporary, 0o666 & ~mask)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        target = _place(temporary, folder, stem)
        if move and not moved:
            source.unlink(missing_ok=True)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if make_active:
        set_active_model(folder, target)
    return target


# --------------------------------------------------------------------------------------------
# a command's --model


def bundled_models(bundled_dir: str | os.PathLike | None = BUNDLED_MODELS_DIR) -> dict[str, Path]:
    """Bundled model name (file stem, e.g. "lung_nodule_lidc") -> its file."""
    return {path.stem: path for path in sorted(_model_files(Path(bundled_dir) if bundled_dir else None))}


def choose_model(choice: str | os.PathLike | None, folder: str | os.PathLike | None = None,
                 bundled_dir: str | os.PathLike | None = BUNDLED_MODELS_DIR, option: str = "--model") -> Path:
    """The model file that a command's `--model` means: a model file's path, or a bundled model's
    name (`lung_nodule_lidc`, `.pt` optional; a file of that path wins); no choice means the active
    model, else the bundled default (`resolve_model`), as in the Slicer panel."""
    bundled = bundled_models(bundled_dir)
    if choice is None or str(choice).strip() == "":
        path = resolve_model(folder, bundled_dir)
        if path is None:
            raise InputError(f"No model is active and the bundled default model is missing; give {option} a model file (.pt) or reinstall the extension.")
        return path
    path = Path(choice).expanduser()
    if path.is_file():
        return path
    name = path.name[: -len(MODEL_SUFFIX)] if path.name.endswith(MODEL_SUFFIX) else path.name
    if str(choice) in (name, name + MODEL_SUFFIX) and name in bundled:
        return bundled[name]
    raise InputError(f"The model {choice} ({option}) does not exist: no such file, and no bundled model has that name; "
                     f"give a model file (.pt) or one of: {', '.join(bundled) or '(no bundled models)'}.")
