"""Installing the module's requirements never changes an installed package: the constraints are built
from this venv's real metadata, and pip itself (a dry run, offline, on hand-made wheels) refuses an
install that would upgrade numpy while it accepts the same install without the constraints."""

import base64
import hashlib
import importlib.metadata
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from LymphNodeClassifierLogic import dependencies as deps

REQUIREMENTS = Path(__file__).resolve().parents[1] / "LymphNodeClassifier" / "Resources" / "requirements.txt"


def test_installed_versions_are_importlib_metadata_s():
    versions = deps.installed_versions()
    for name in ("numpy", "simpleitk", "scipy", "vtk", "packaging"):
        assert versions[name] == importlib.metadata.version(name), name


def test_constraints_hold_every_installed_package_but_the_ones_being_installed():
    installed = deps.installed_versions()
    requirements = [Requirement("scikit-learn>=1.3"), Requirement("brand-new-package")]
    lines = deps.constraint_lines(requirements, installed)
    pinned = dict(line.split("==") for line in lines)
    for name in ("numpy", "simpleitk", "scipy", "vtk"):  # what Slicer ships
        assert pinned[name] == importlib.metadata.version(name)
    assert "scikit-learn" not in pinned and "brand-new-package" not in pinned
    assert set(pinned) == set(installed) - {"scikit-learn"}
    # a requirement naming Slicer's own package still leaves it pinned
    assert "numpy==" + installed["numpy"] in deps.constraint_lines([Requirement("numpy>=1")], installed)


def test_missing_requirements_compare_versions():
    installed = {"slicerio": "1.0", "scikit-learn": "1.5.0"}
    missing = deps.missing_requirements([Requirement("slicerio>=1.1"), Requirement("scikit-learn>=1.3"),
                                         Requirement("cleanlab>=2.6")], installed)
    assert [str(r) for r in missing] == ["slicerio>=1.1", "cleanlab>=2.6"]
    assert [r.name for r in deps.read_requirements(REQUIREMENTS)] == ["slicerio", "scikit-learn", "cleanlab", "isal"]


def test_torch_status_compares_the_installed_version_with_the_minimum():
    assert deps.torch_status("2.1", {"torch": "2.0.1"}).too_old
    assert deps.torch_status("2.1", {"torch": "2.1.0+cpu"}).ok
    assert not deps.torch_status("2.1", {}).ok and "not installed" in deps.torch_status("2.1", {}).message()
    assert "2.0.1" in deps.torch_status("2.1", {"torch": "2.0.1"}).message()
    this_venv = deps.torch_status()
    assert this_venv.installed == importlib.metadata.version("torch") and this_venv.ok


def _wheel(folder: Path, name: str, version: str, requires=()) -> Path:
    """A minimal valid wheel (metadata only): enough for pip's resolver."""
    dist_info = f"{name}-{version}.dist-info"
    files = {
        f"{dist_info}/METADATA": "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}".format(
            name, version, "".join(f"Requires-Dist: {r}\n" for r in requires)),
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist_info}/RECORD"] = "\n".join(record + [f"{dist_info}/RECORD,,"]) + "\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def _dry_run(wheels: Path, requirement: str, constraints: Path | None, tmp_path: Path):
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--find-links", str(wheels),
               "--disable-pip-version-check", "--quiet", "--report", str(report), requirement]
    if constraints is not None:
        command += ["-c", str(constraints)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    installs = {}
    if done.returncode == 0:
        installs = {item["metadata"]["name"].lower(): item["metadata"]["version"]
                    for item in json.loads(report.read_text())["install"]}
    return done, installs


def test_pip_refuses_an_upgrade_of_numpy_under_the_constraints(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "numpy", "999.0")  # a "newer numpy" that a careless install would pull in
    _wheel(wheels, "lnc_probe", "1.0", requires=["numpy>=999"])
    _wheel(wheels, "lnc_friendly", "1.0", requires=["numpy>=1"])

    done, installs = _dry_run(wheels, "lnc_probe", None, tmp_path)
    assert done.returncode == 0, done.stderr
    assert installs.get("numpy") == "999.0"  # without constraints pip would replace Slicer's numpy

    constraints = deps.write_constraints(deps.constraint_lines([Requirement("lnc_probe")]), tmp_path)
    assert f"numpy=={importlib.metadata.version('numpy')}" in constraints.read_text().splitlines()
    done, _ = _dry_run(wheels, "lnc_probe", constraints, tmp_path)
    assert done.returncode != 0 and "conflicting dependencies" in done.stderr  # resolution refused, nothing replaced

    done, installs = _dry_run(wheels, "lnc_friendly", constraints, tmp_path)  # new packages are still fine
    assert done.returncode == 0, done.stderr
    assert installs == {"lnc_friendly": "1.0"}  # numpy stays as installed


def test_write_constraints_writes_one_pin_per_line(tmp_path):
    path = deps.write_constraints(["a==1", "b==2.0"], tmp_path)
    assert path.parent == tmp_path and path.read_text().splitlines()[1:] == ["a==1", "b==2.0"]


@pytest.mark.parametrize("text", ["not a requirement ==", "pkg >>> 1"])
def test_a_broken_requirements_line_names_its_line(tmp_path, text):
    path = tmp_path / "requirements.txt"
    path.write_text(f"# comment\n{text}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="Line 2"):
        deps.read_requirements(path)


def test_a_held_package_the_metadata_scan_missed_is_pinned_at_its_module_version():
    """Slicer's own VTK is built with Slicer and may have no pip metadata: it is still held, at vtk.__version__."""
    import numpy
    import vtk

    installed = {name: version for name, version in deps.installed_versions().items() if name not in ("vtk", "numpy")}
    lines = deps.constraint_lines([Requirement("brand-new-package")], installed)
    assert f"vtk=={vtk.__version__}" in lines and f"numpy=={numpy.__version__}" in lines
    # a held name that is not importable adds nothing (there is nothing installed to hold)
    assert deps.constraint_lines([], {}, held=("lnc_no_such_module",)) == []


def test_requirements_still_missing_after_the_install_raise_one_error(tmp_path, monkeypatch):
    """slicer.packaging.pip_ensure installs nothing in testing mode (skip_in_testing=True: it returns None,
    Base/Python/slicer/packaging.py); what is still missing afterwards is an error, not reported as installed."""
    import types

    slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
    calls = []
    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_ensure = lambda requirements, constraints=None, requester=None: calls.append(requirements)
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    monkeypatch.setattr(slicer, "packaging", packaging, raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(testingEnabled=lambda: True), raising=False)
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("packaging>=1\nlnc-no-such-package>=1\n", encoding="utf-8")
    with pytest.raises(RuntimeError, match=r"still not installed: lnc-no-such-package>=1 \(Slicer installs nothing in testing mode\)"):
        deps.install_requirements(requirements)
    assert calls == [["lnc-no-such-package>=1"]]  # only what was missing was asked for
    requirements.write_text("packaging>=1\n", encoding="utf-8")
    assert deps.install_requirements(requirements) == []  # nothing missing: nothing asked, nothing raised
    assert len(calls) == 1
