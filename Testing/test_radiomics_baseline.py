"""bench/bench_radiomics.py: the classical baseline and the stacker are honest out-of-fold models.

- the features wrapper: pyradiomics on an analytic sphere (anisotropic voxels, several mask
  components merged as one nodule, int16 HU) gives its volume and constant HU;
- nested OOF: C is chosen only on the outer training part (never on a held-out patient), the
  held-out fold is predicted by a model fit without it, and an uninformative feature scores ~0.5;
- docs/lidc_baselines_oof.csv (every documented LIDC baseline number comes from it): the folds are
  the CNN's, patients never span folds, and the AUCs in docs/LIDC_RESULTS.md are recomputed.
Skipped, with the reason, when pyradiomics is not installed (a bench / test extra).
"""

import csv
import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from sklearn.metrics import roc_auc_score

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("bench_radiomics", ROOT / "bench" / "bench_radiomics.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)
BASELINES = ROOT / "docs" / "lidc_baselines_oof.csv"


def test_radiomics_features_of_an_analytic_sphere(tmp_path):
    pytest.importorskip("radiomics", reason="pyradiomics (a bench / test extra) is not installed")
    spacing = (0.7, 0.7, 2.0)
    size = (60, 60, 24)
    k, j, i = np.meshgrid(*(np.arange(n) * s for n, s in zip(size[::-1], spacing[::-1])), indexing="ij")
    centre = (np.array(size) * np.array(spacing) / 2.0)
    radius = 8.0
    inside = (i - centre[0]) ** 2 + (j - centre[1]) ** 2 + (k - centre[2]) ** 2 <= radius ** 2
    hu = np.where(inside, 40, -800).astype(np.int16)
    mask = inside.astype(np.uint8)
    mask[inside & (i > centre[0])] = 2  # two label values / components: still one nodule (mask > 0)
    (tmp_path / "image").mkdir()
    (tmp_path / "mask").mkdir()
    for name, array in (("image", hu), ("mask", mask)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing)
        image.SetOrigin((-12.0, 30.0, 100.0))
        sitk.WriteImage(image, str(tmp_path / name / "N1.nii.gz"))
    (tmp_path / "labels.csv").write_text("case,image,mask\nN1,image/N1.nii.gz,mask/N1.nii.gz\n")
    names, values = bench.radiomics_features(tmp_path, np.array(["N1"]), tmp_path / "cache.csv")
    features = dict(zip(names, values[0]))
    assert features["original_shape_MeshVolume"] == pytest.approx(4 / 3 * math.pi * radius ** 3, rel=0.08)
    assert features["original_shape_Sphericity"] > 0.8  # a voxelised sphere: staircase surface
    assert features["original_firstorder_Median"] == pytest.approx(40.0, abs=1.0)
    again_names, again = bench.radiomics_features(tmp_path, np.array(["N1"]), tmp_path / "cache.csv")  # from the cache
    assert again_names == names and np.allclose(again, values, equal_nan=True)


def test_nested_oof_never_chooses_on_the_held_out_fold(monkeypatch):
    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(120), 2).astype(str)
    y = rng.integers(0, 2, patients.size)
    informative = y + rng.normal(0, 0.8, y.size)
    noise = rng.normal(size=y.size)
    fold = np.array([int(p) % 5 for p in patients])
    seen = []
    original = bench.choose_c

    def spy(x, yy, groups, seed):
        seen.append(set(groups.tolist()))
        return original(x, yy, groups, seed)

    monkeypatch.setattr(bench, "choose_c", spy)
    oof, chosen = bench.nested_oof(np.stack([informative, noise], axis=1), y, patients, fold)
    assert len(seen) == 5 and len(chosen) == 5 and np.isfinite(oof).all()
    for k, groups in enumerate(seen):  # outer folds in order 0..4
        assert groups == set(patients[fold != k])  # C chosen on exactly the outer training patients
    assert roc_auc_score(y, oof) > 0.75
    only_noise, _ = bench.nested_oof(noise[:, None], y, patients, fold)
    assert roc_auc_score(y, only_noise) < 0.6  # no skill from noise (OOF intercept-only models even fall below 0.5)


@pytest.mark.skipif(not BASELINES.is_file(), reason="docs/lidc_baselines_oof.csv has not been written by bench/bench_radiomics.py")
def test_documented_baselines_are_recomputed_from_their_oof_file():
    with open(BASELINES, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    cnn = {row["case_id"]: row for row in csv.DictReader(open(ROOT / "docs" / "lidc_cnn_v1_oof_predictions.csv", newline="", encoding="utf-8"))}
    assert len(rows) == len(cnn) == 603
    for row in rows:  # the CNN's own folds, labels and OOF probabilities
        assert int(row["fold"]) == int(cnn[row["case_id"]]["fold"]) and int(row["label"]) == int(cnn[row["case_id"]]["label"])
        assert float(row["cnn"]) == float(cnn[row["case_id"]]["probability"])
    patients, folds = np.array([r["patient_id"] for r in rows]), np.array([int(r["fold"]) for r in rows])
    for k in np.unique(folds):
        assert not set(patients[folds == k]) & set(patients[folds != k])
    y = np.array([int(r["label"]) for r in rows])
    doc = (ROOT / "docs" / "LIDC_RESULTS.md").read_text(encoding="utf-8")
    models = [name for name in rows[0] if name not in ("case_id", "patient_id", "fold", "label")]
    checked = 0
    for name in models:
        auc = roc_auc_score(y, np.array([float(r[name]) for r in rows]))
        match = re.search(rf"^\| `{re.escape(name)}` \| (\d\.\d{{3}}) ", doc, flags=re.MULTILINE)
        if match:
            assert float(match.group(1)) == pytest.approx(auc, abs=0.0005), name
            checked += 1
    assert checked >= 6  # the size rules, the CNN, radiomics and the stackers are all in the table
