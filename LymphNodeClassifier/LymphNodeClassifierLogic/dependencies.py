"""Install the module's Python requirements without ever changing what Slicer's Python already has (no Qt).

Other extensions' users lose their Slicer when an install upgrades or replaces a package Slicer ships
(numpy, SimpleITK, scipy, VTK) or one another extension installed. So the requirements are installed
with a pip constraints file that pins EVERY installed distribution to its installed version (Slicer's
own packages always among them), except the requirements being installed themselves: pip may add new
packages, but a requirement that needs another version of something installed fails to resolve
(one clear error) instead of replacing it.

- `installed_versions()`: canonical distribution name -> installed version (importlib.metadata).
- `read_requirements(path)` / `missing_requirements(requirements, installed)`.
- `constraint_lines(requirements, installed)`: the ``name==version`` lines; `write_constraints`.
- `torch_status(minimum)`: whether the installed PyTorch is missing, older than `minimum` or fine,
  read from its metadata without importing it (the PyTorch extension's `installTorch` takes the
  minimum as ``torchVersionRequirement=">=..."``, but its `torchInstalled()` never compares versions).
- `install_requirements(path, requester)`: inside Slicer, `slicer.packaging.pip_ensure(...,
  constraints=...)` where the Slicer version has it (Slicer >= 5.10), else a confirmation and
  `slicer.util.pip_install([... , "-c", constraints])` (older releases).
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

# What Slicer ships and an install must never change: held even if the metadata scan missed them (a package built
# with Slicer, such as its VTK, may have no pip metadata), then at the imported module's __version__.
SLICER_PACKAGES = ("numpy", "SimpleITK", "scipy", "vtk")
MINIMUM_TORCH_VERSION = "2.1"  # the bundled TorchScript models are saved with a recent PyTorch


def installed_versions() -> dict[str, str]:
    """Canonical name -> version of every distribution importlib.metadata sees (the first one on sys.path wins)."""
    versions: dict[str, str] = {}
    for distribution in importlib.metadata.distributions():
        name = distribution.metadata["Name"] if distribution.metadata is not None else None
        version = distribution.version
        if not name or not version:  # broken metadata: nothing to pin
            continue
        versions.setdefault(canonicalize_name(name), version)
    return versions


def read_requirements(path: str | os.PathLike) -> list[Requirement]:
    """The requirements of a requirements file (comments, blank lines and pip options skipped)."""
    requirements = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith(("#", "-")):
            continue
        try:
            requirements.append(Requirement(line))
        except InvalidRequirement as error:
            raise ValueError(f"Line {number} of {path} is not a requirement ({error}).") from None
    return requirements


def missing_requirements(requirements: Iterable[Requirement], installed: Mapping[str, str] | None = None) -> list[Requirement]:
    """The requirements that are not installed, or installed in a version they do not accept."""
    installed = installed_versions() if installed is None else installed
    missing = []
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        version = installed.get(canonicalize_name(requirement.name))
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            missing.append(requirement)
    return missing


def _pinnable(version: str) -> bool:
    try:
        Version(version)
    except InvalidVersion:
        return False
    return True


def _module_version(import_name: str) -> str | None:
    """The ``__version__`` of an importable module (None when it is not importable or has none)."""
    try:
        module = importlib.import_module(import_name)
    except Exception:  # not installed, or broken: then there is nothing of it to hold
        return None
    version = getattr(module, "__version__", None)
    return version if isinstance(version, str) else None


def constraint_lines(requirements: Iterable[Requirement], installed: Mapping[str, str] | None = None,
                     held: Iterable[str] = SLICER_PACKAGES) -> list[str]:
    """``name==version`` for every installed distribution except those `requirements` install or upgrade.

    A package of `held` (Slicer's own, named as it is imported) is pinned even when a requirement names it,
    and even when the metadata scan did not see it (then at its module's ``__version__``): its requirement must
    then accept the installed version or the install fails, rather than replacing what Slicer ships.
    """
    installed = dict(installed_versions() if installed is None else installed)
    held = tuple(held)
    for import_name in held:
        name = canonicalize_name(import_name)
        if name not in installed:
            version = _module_version(import_name)
            if version is not None:
                installed[name] = version
    held_names = {canonicalize_name(name) for name in held}
    installing = {canonicalize_name(r.name) for r in requirements} - held_names
    return sorted(f"{name}=={version}" for name, version in installed.items()
                  if name not in installing and _pinnable(version))


def write_constraints(lines: Iterable[str], folder: str | os.PathLike | None = None) -> Path:
    """The constraint lines in a new temporary file (the caller removes it)."""
    handle, path = tempfile.mkstemp(prefix="lymphnode-constraints-", suffix=".txt", dir=folder)
    with os.fdopen(handle, "w", encoding="utf-8") as constraints:
        constraints.write("# Installed versions held fixed while LymphNodeClassifier installs its requirements\n")
        constraints.writelines(line + "\n" for line in lines)
    return Path(path)


@dataclass(frozen=True)
class TorchStatus:
    installed: str | None  # the installed version, None when PyTorch is not installed
    minimum: str

    @property
    def ok(self) -> bool:
        return self.installed is not None and not self.too_old

    @property
    def too_old(self) -> bool:
        if self.installed is None:
            return False
        try:
            return Version(self.installed).release < Version(self.minimum).release  # 2.1.0+cpu counts as 2.1.0
        except InvalidVersion:
            return True

    def message(self) -> str:
        if self.installed is None:
            return f"PyTorch is not installed; Lymph Node Classifier needs PyTorch {self.minimum} or newer."
        if self.too_old:
            return (f"PyTorch {self.installed} is installed, but Lymph Node Classifier needs {self.minimum} or newer "
                    "(its models cannot be loaded by older releases); update it with the PyTorch Utils module, then restart Slicer.")
        return f"PyTorch {self.installed}."


def torch_status(minimum: str = MINIMUM_TORCH_VERSION, installed: Mapping[str, str] | None = None) -> TorchStatus:
    """The installed PyTorch compared with `minimum`, from its metadata (torch is not imported)."""
    installed = installed_versions() if installed is None else installed
    return TorchStatus(installed.get("torch"), minimum)


def install_requirements(requirements_path: str | os.PathLike, requester: str = "Lymph Node Classifier") -> list[str]:
    """Install the file's missing requirements inside Slicer with every installed version held; returns what was missing.

    Raises RuntimeError when the user declines or when requirements are still missing afterwards (pip_ensure
    installs nothing in testing mode: skip_in_testing), subprocess.CalledProcessError when pip fails
    (e.g. a requirement would need another version of a package Slicer has).
    """
    import slicer
    import slicer.util

    missing = missing_requirements(read_requirements(requirements_path))
    if not missing:
        return []
    constraints = write_constraints(constraint_lines(missing))
    try:
        try:
            import slicer.packaging as packaging  # Slicer >= 5.10; `slicer.packaging` is None until imported
        except ImportError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure([str(r) for r in missing], constraints=str(constraints), requester=requester)
        else:
            names = ", ".join(str(r) for r in missing)
            if not slicer.util.confirmOkCancelDisplay(
                    f"{requester} will install these Python packages: {names}. Installed packages are kept as they are."):
                raise RuntimeError("installation declined by the user")
            slicer.util.pip_install([str(r) for r in missing] + ["-c", str(constraints)])
    finally:
        constraints.unlink(missing_ok=True)
    importlib.invalidate_caches()  # the metadata of what pip just wrote
    still_missing = missing_requirements(missing)
    if still_missing:
        raise RuntimeError("these Python packages are still not installed: " + ", ".join(str(r) for r in still_missing)
                           + (" (Slicer installs nothing in testing mode)" if _testing(slicer) else "")
                           + "; install them with pip_install from Slicer's Python console, then try again.")
    return [str(r) for r in missing]


def _testing(slicer) -> bool:
    try:
        return bool(slicer.app.testingEnabled())
    except AttributeError:  # no application (a bare Python with slicer-core)
        return False
