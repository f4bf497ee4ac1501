"""Abdominal CT phantoms: determinism, truth columns, masks, HU realism, shapes, size-rule AUC,
tilted grids, scanner variety, the command line and the bundled sample case."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from LymphNodeClassifierLib import phantoms
from LymphNodeClassifierLib.dataset import Dataset
from LymphNodeClassifierLib.errors import InputError
from LymphNodeClassifierLib.phantoms import NODE_FIRST, TISSUES, PhantomConfig, generate_case, generate_cohort, main, sample_node_truths

MODULE_DIR = Path(__file__).resolve().parents[1] / "LymphNodeClassifier"
SAMPLE_DIR = MODULE_DIR / "Resources" / "SampleData"
COHORT_CASES = 40
COHORT_SEED = 11
LABEL_NOISE = 0.2


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A rendered cohort shared by the tests below (40 studies, 320 nodes)."""
    return generate_cohort(tmp_path_factory.mktemp("cohort"), COHORT_CASES, COHORT_SEED, label_noise=LABEL_NOISE)


@pytest.fixture(scope="module")
def cohort_images(cohort):
    """case_id -> (CT image, label image, label array)."""
    out = {}
    for case in cohort.cases:
        labels = sitk.ReadImage(str(cohort.labels_path(case)))
        out[case.case_id] = (sitk.ReadImage(str(cohort.ct_path(case))), labels, sitk.GetArrayFromImage(labels))
    return out


def per_slice_axes(mask: np.ndarray, spacing_xy: float) -> tuple[float, float]:
    """(long, short) axis of a node mask [k, j, i]: on the slice with the longest diameter, the
    longest extent over directions and the extent perpendicular to it (pixel edges included)."""
    best = (0.0, 0.0)
    angles = np.radians(np.arange(0.0, 180.0, 2.0))
    directions = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    for k in np.nonzero(mask.reshape(mask.shape[0], -1).any(axis=1))[0]:
        j, i = np.nonzero(mask[k])
        points = np.stack([i, j], axis=1) * spacing_xy
        projection = points @ directions.T
        extent = projection.max(axis=0) - projection.min(axis=0) + spacing_xy
        longest = int(np.argmax(extent))
        candidate = (float(extent[longest]), float(extent[(longest + len(angles) // 2) % len(angles)]))
        if candidate[0] > best[0]:
            best = candidate
    return best


# ---- determinism --------------------------------------------------------------------------------


def test_same_seed_same_case_and_another_seed_another_case():
    a = generate_case(11, slice_thickness_mm=5.0, return_tissue=True)
    b = generate_case(11, slice_thickness_mm=5.0, return_tissue=True)
    c = generate_case(12, slice_thickness_mm=5.0)
    for image in ("ct", "labels", "tissue"):
        assert np.array_equal(sitk.GetArrayViewFromImage(getattr(a, image)), sitk.GetArrayViewFromImage(getattr(b, image)))
    assert a.ct.GetOrigin() == b.ct.GetOrigin() and a.ct.GetDirection() == b.ct.GetDirection()
    assert a.nodes == b.nodes and a.scanner == b.scanner
    assert a.ct.GetSize() != c.ct.GetSize() or not np.array_equal(sitk.GetArrayViewFromImage(a.ct), sitk.GetArrayViewFromImage(c.ct))
    assert a.nodes != c.nodes
    # a Generator works as well as a seed, and consumes only its own stream
    d = generate_case(np.random.default_rng(11), slice_thickness_mm=5.0)
    assert np.array_equal(sitk.GetArrayViewFromImage(a.ct), sitk.GetArrayViewFromImage(d.ct))


def test_same_seed_same_cohort_files(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    first = generate_cohort(tmp_path / "a", 3, 5, label_noise=0.3)
    second = generate_cohort(tmp_path / "b", 3, 5, label_noise=0.3)
    other = generate_cohort(tmp_path / "c", 3, 6, label_noise=0.3)
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.path.read_bytes() != other.path.read_bytes()
    for case in first.cases:
        for path_of in (first.ct_path, first.labels_path):
            x = sitk.ReadImage(str(path_of(case)))
            y = sitk.ReadImage(str(path_of(second.case(case.case_id))))
            assert np.array_equal(sitk.GetArrayViewFromImage(x), sitk.GetArrayViewFromImage(y))
    # a smaller cohort with the same seed is a prefix of a larger one
    prefix = generate_cohort(tmp_path / "d", 2, 5)
    assert [c.case_id for c in prefix.cases] == [c.case_id for c in first.cases][:2]
    x = sitk.ReadImage(str(prefix.ct_path(prefix.cases[1])))
    y = sitk.ReadImage(str(first.ct_path(first.cases[1])))
    assert np.array_equal(sitk.GetArrayViewFromImage(x), sitk.GetArrayViewFromImage(y))


# ---- truth columns and masks ----------------------------------------------------------------------


def test_cohort_truth_columns_and_label_noise_rule(cohort):
    nodes = cohort.nodes
    assert len(cohort.cases) == COHORT_CASES and len(nodes) >= 300
    for node in nodes:
        assert node.true_metastatic in (0, 1) and node.metastatic in (0, 1)
        assert node.label_flipped == (node.metastatic != node.true_metastatic)
    assert sum(node.label_flipped for node in nodes) == int(round(LABEL_NOISE * len(nodes)))
    assert 0.38 <= np.mean([node.true_metastatic for node in nodes]) <= 0.62  # roughly balanced
    assert cohort.generator["seed"] == COHORT_SEED and cohort.generator["label_noise"] == LABEL_NOISE
    # ids, patients and several studies for some patients
    for case in cohort.cases:
        assert re.fullmatch(r"P\d{4}-S\d", case.case_id) and case.case_id.startswith(case.patient_id + "-S")
        assert case.ct == f"images/{case.case_id}_ct.nrrd" and case.labels == f"images/{case.case_id}_labels.nrrd"
    groups = cohort.patient_groups()
    assert any(len(ids) > 1 for ids in groups.values())
    assert sum(len(ids) for ids in groups.values()) == COHORT_CASES
    # the same physical node keeps its label value and class across a patient's studies
    for ids in groups.values():
        if len(ids) > 1:
            truths = [{n.label_value: n.true_metastatic for n in cohort.nodes_of(i)} for i in ids]
            assert all(t == truths[0] for t in truths)


def test_no_label_noise_means_no_flip(tmp_path):
    dataset = generate_cohort(tmp_path / "clean", 2, 8)
    assert all(not n.label_flipped and n.metastatic == n.true_metastatic for n in dataset.nodes)


def test_every_node_has_its_own_separate_mask(cohort, cohort_images):
    for case in cohort.cases:
        ct, labels, array = cohort_images[case.case_id]
        assert labels.GetPixelID() == sitk.sitkUInt16 and ct.GetPixelID() == sitk.sitkInt16
        assert labels.GetSize() == ct.GetSize() and labels.GetOrigin() == ct.GetOrigin() and labels.GetDirection() == ct.GetDirection()
        records = cohort.nodes_of(case.case_id)
        values = sorted(n.label_value for n in records)
        assert values == list(range(1, len(records) + 1))
        assert 2 <= len(records) <= 12
        assert sorted(set(np.unique(array)) - {0}) == values
        # masks never touch: 26-connected components of the union = one per node
        _, count = ndimage.label(array > 0, structure=np.ones((3, 3, 3)))
        assert count == len(records), case.case_id


def test_node_centres_are_inside_their_masks_on_every_grid(cohort, cohort_images):
    tilted = 0
    for case in cohort.cases:
        ct, labels, array = cohort_images[case.case_id]
        direction = np.array(ct.GetDirection()).reshape(3, 3)
        assert np.allclose(direction @ direction.T, np.eye(3), atol=1e-9)
        scanner = case.extra["phantom"]
        if scanner["tilted"]:
            tilted += 1
            assert not np.allclose(direction, np.eye(3))
        else:
            assert np.allclose(direction, np.eye(3))
        spacing = np.array(ct.GetSpacing())
        for node in cohort.nodes_of(case.case_id):
            centre = node.extra["phantom"]["centre_lps"]
            i, j, k = labels.TransformPhysicalPointToIndex(centre)
            assert array[k, j, i] == node.label_value
            # and the mask is centred on the recorded centre (its voxels' physical centroid)
            kk, jj, ii = np.nonzero(array == node.label_value)
            points = np.stack([ii, jj, kk], axis=1) * spacing @ direction.T + np.array(ct.GetOrigin())
            assert np.linalg.norm(points.mean(axis=0) - centre) < 0.6 * spacing[2] + 1.5
    assert tilted >= 3


def test_tilted_case_geometry():
    case = generate_case(4, tilt=True, slice_thickness_mm=2.5, n_nodes=6)
    direction = np.array(case.ct.GetDirection()).reshape(3, 3)
    assert case.scanner["tilted"] and not np.allclose(direction, np.eye(3))
    angle = abs(case.scanner["gantry_tilt_deg"]) or abs(case.scanner["si_rotation_deg"])
    assert angle > 0.9
    labels = sitk.GetArrayViewFromImage(case.labels)
    for node in case.nodes:
        i, j, k = case.labels.TransformPhysicalPointToIndex(node["centre_lps"])
        assert labels[k, j, i] == node["label_value"]


# ---- HU realism -----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [3, 17])
def test_tissue_hu_are_realistic(seed):
    case = generate_case(seed, slice_thickness_mm=2.5, spacing_mm=0.8, tilt=False, return_tissue=True)
    ct = sitk.GetArrayFromImage(case.ct).astype(float)
    tissue = sitk.GetArrayFromImage(case.tissue)

    def median(name):
        region = ndimage.binary_erosion(tissue == TISSUES[name], iterations=2)  # away from partial volume
        assert region.sum() > 50, name
        return float(np.median(ct[region]))

    assert median("air") < -980
    assert -125 <= median("subcutaneous_fat") <= -85
    assert -120 <= median("visceral_fat") <= -80
    assert 30 <= median("muscle") <= 70 and 30 <= median("psoas") <= 70
    assert 120 < median("aorta") <= 260
    assert 90 <= median("ivc") <= 160
    assert median("kidney_cortex") > 120
    assert np.percentile(ct[tissue == TISSUES["bone_cortical"]], 90) > 500
    assert 150 <= median("bone_cancellous") <= 320
    if ndimage.binary_erosion(tissue == TISSUES["bowel_gas"], iterations=2).sum() > 50:
        assert median("bowel_gas") < -900
    # every tissue is present that the case promises
    present = set(np.unique(tissue))
    for name in ("air", "skin", "subcutaneous_fat", "muscle", "visceral_fat", "bone_cortical", "aorta", "ivc", "kidney_cortex", "psoas", "bowel_wall"):
        assert TISSUES[name] in present, name
    assert any(t >= NODE_FIRST for t in present)


def test_bowel_has_gas_fluid_and_air_fluid_levels():
    """Over a few patients: gas-only loops, fluid loops and loops with a gas cap over fluid (anterior = smaller y)."""
    gas_over_fluid = 0
    kinds = set()
    for seed in range(6):
        case = generate_case(seed, slice_thickness_mm=5.0, tilt=False, return_tissue=True)
        tissue = sitk.GetArrayFromImage(case.tissue)
        gas = tissue == TISSUES["bowel_gas"]
        fluid = (tissue == TISSUES["bowel_fluid"]) | (tissue == TISSUES["oral_contrast"])
        kinds.update(name for name in ("bowel_gas", "bowel_fluid", "feces") if (tissue == TISSUES[name]).any())
        # a gas voxel directly anterior (row above) to a fluid voxel = an air-fluid level
        gas_over_fluid += int((gas[:, :-1, :] & fluid[:, 1:, :]).sum())
    assert kinds == {"bowel_gas", "bowel_fluid", "feces"}
    assert gas_over_fluid > 20


def test_nodes_hu_by_class():
    benign, metastatic = [], []
    for seed in (21, 22, 23):
        case = generate_case(seed, slice_thickness_mm=1.25, spacing_mm=0.75, tilt=False, return_tissue=True)
        ct = sitk.GetArrayFromImage(case.ct).astype(float)
        labels = sitk.GetArrayFromImage(case.labels)
        for node in case.nodes:
            core = ndimage.binary_erosion(labels == node["label_value"], iterations=1)
            if core.sum() >= 10:
                (metastatic if node["metastatic"] else benign).append(float(np.median(ct[core])))
    assert benign and metastatic
    assert 0 <= np.median(benign) <= 55
    assert 25 <= np.median(metastatic) <= 95


# ---- shapes and sizes -----------------------------------------------------------------------------


def test_benign_nodes_are_oval_and_metastatic_ones_round():
    ratios = {0: [], 1: []}
    for seed in (31, 32, 33, 34):
        case = generate_case(seed, slice_thickness_mm=0.8, spacing_mm=0.7, tilt=False)
        labels = sitk.GetArrayFromImage(case.labels)
        spacing = np.array(case.labels.GetSpacing())
        for node in case.nodes:
            kk, jj, ii = np.nonzero(labels == node["label_value"])
            if len(kk) < 60:
                continue
            points = np.stack([ii, jj, kk], axis=1) * spacing
            eig = np.sort(np.linalg.eigvalsh(np.cov(points.T)))
            ratios[node["metastatic"]].append(float(np.sqrt(eig[2] / eig[0])))
            # the recorded truth agrees
            low, high = (1.0, 1.45) if node["metastatic"] else (1.45, 2.55)
            assert low <= node["long_short_ratio"] <= high
    assert len(ratios[0]) >= 5 and len(ratios[1]) >= 5
    assert np.median(ratios[0]) > np.median(ratios[1]) + 0.3
    assert roc_auc_score([0] * len(ratios[0]) + [1] * len(ratios[1]), [-r for r in ratios[0] + ratios[1]]) > 0.85


def test_size_rule_auc_on_true_short_axes():
    truths = sample_node_truths(8, 55)
    assert len(truths) >= 300
    y = [t["metastatic"] for t in truths]
    auc = roc_auc_score(y, [t["short_axis_mm"] for t in truths])
    assert 0.65 <= auc <= 0.80, auc
    assert 0.4 <= np.mean(y) <= 0.6
    short = np.array([t["short_axis_mm"] for t in truths])
    assert short.min() >= 3.0 and short.max() <= 18.0 * 1.0001
    # metastatic nodes: necrosis in about a third, never a fatty hilum; benign: hilum in about 60 %
    meta = [t for t in truths if t["metastatic"]]
    benign = [t for t in truths if not t["metastatic"]]
    assert 0.2 <= np.mean([t["necrosis"] for t in meta]) <= 0.5 and not any(t["fatty_hilum"] for t in meta)
    assert 0.45 <= np.mean([t["fatty_hilum"] for t in benign]) <= 0.75 and not any(t["necrosis"] for t in benign)


def test_size_rule_auc_on_rendered_masks(cohort, cohort_images):
    y, measured, true = [], [], []
    for case in cohort.cases:
        ct, labels, array = cohort_images[case.case_id]
        for node in cohort.nodes_of(case.case_id):
            _, short = per_slice_axes(array == node.label_value, labels.GetSpacing()[0])
            y.append(node.true_metastatic)
            measured.append(short)
            true.append(node.extra["phantom"]["short_axis_mm"])
    measured, true = np.array(measured), np.array(true)
    assert len(y) >= 300
    auc = roc_auc_score(y, measured)
    assert 0.65 <= auc <= 0.80, auc
    assert 0.65 <= roc_auc_score(y, true) <= 0.80
    # masks measure like the truth (annotator jitter and partial volume, no bias beyond a voxel)
    assert np.corrcoef(measured, true)[0, 1] > 0.8
    assert abs(np.median(measured - true)) < 1.0


# ---- scanner variety and volume size -------------------------------------------------------------


def test_scanner_variety_and_small_volumes(cohort, cohort_images):
    config = PhantomConfig()
    thicknesses, spacings = set(), []
    for case in cohort.cases:
        scanner = case.extra["phantom"]
        ct = cohort_images[case.case_id][0]
        sx, sy, sz = ct.GetSpacing()
        assert sx == pytest.approx(sy) and config.spacing_xy_mm[0] - 1e-6 <= sx <= config.spacing_xy_mm[1] + 1e-6
        assert sz == pytest.approx(scanner["slice_thickness_mm"]) and scanner["slice_thickness_mm"] in config.slice_thickness_choices_mm
        assert config.noise_sigma_hu[0] <= scanner["noise_sigma_hu"] <= config.noise_sigma_hu[1]
        assert config.psf_sigma_mm[0] <= scanner["psf_sigma_mm"] <= config.psf_sigma_mm[1]
        assert np.prod(ct.GetSize()) <= config.max_voxels
        width, height, depth = (n * s for n, s in zip(ct.GetSize(), ct.GetSpacing()))
        assert 220 <= width <= 400 and 160 <= height <= 320 and 25 <= depth <= 130
        thicknesses.add(scanner["slice_thickness_mm"])
        spacings.append(sx)
    assert len(thicknesses) >= 4 and np.ptp(spacings) > 0.2
    sizes = [cohort.ct_path(c).stat().st_size + cohort.labels_path(c).stat().st_size for c in cohort.cases]
    assert np.mean(sizes) < 4e6 and max(sizes) < 5e6


def test_clinical_size_case():
    case = generate_case(5, clinical_size=True)
    assert case.ct.GetSize() == (512, 512, 110)
    assert 0.7 <= case.ct.GetSpacing()[0] <= 0.8 and case.ct.GetSpacing()[2] == 1.25
    assert 8 <= len(case.nodes) <= 10
    assert np.allclose(np.array(case.ct.GetDirection()), np.eye(3).ravel())
    assert sorted(set(np.unique(sitk.GetArrayViewFromImage(case.labels))) - {0}) == list(range(1, len(case.nodes) + 1))


# ---- command line and errors ----------------------------------------------------------------------


def test_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--cases", "2", "--seed", "4", "--label-noise", "0.5", "--quiet"]) == 0
    dataset = Dataset.load(out)
    assert len(dataset.cases) == 2 and dataset.generator["label_noise"] == 0.5
    assert sum(n.label_flipped for n in dataset.nodes) == int(round(0.5 * len(dataset.nodes)))
    assert main(["--out", str(out), "--cases", "2", "--quiet"]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "x"), "--cases", "0"]) == 2
    assert main(["--out", str(tmp_path / "y"), "--cases", "1", "--label-noise", "1.5"]) == 2
    assert main(["--cases", "2"]) == 2  # --out is required: one line, exit 2
    assert "--out" in capsys.readouterr().err.splitlines()[-1]


def test_module_runs_as_a_script():
    result = subprocess.run([sys.executable, "-m", "LymphNodeClassifierLib.phantoms", "--help"], cwd=MODULE_DIR, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--label-noise" in result.stdout and "--clinical-size" in result.stdout


def test_bad_arguments_raise_input_errors(tmp_path):
    with pytest.raises(InputError):
        generate_cohort(tmp_path / "a", 0, 1)
    with pytest.raises(InputError):
        generate_cohort(tmp_path / "b", 1, -1)
    with pytest.raises(InputError):
        generate_cohort(tmp_path / "c", 1, 1, label_noise=-0.1)
    with pytest.raises(InputError):
        generate_case(-3)


# ---- generator settings: what a scanner and a patient change --------------------------------------


def _noise_of(seed: int, **settings) -> tuple[np.ndarray, np.ndarray]:
    """(noise, its CT) of a small case: the CT minus the same case rendered practically noise-free.
    A (low, high) range always takes one draw, so both renderings share every other random number."""
    options = dict(n_nodes=2, n_metastatic=1, spacing_mm=0.9, slice_thickness_mm=5.0, tilt=False)
    quiet = generate_case(seed, PhantomConfig(noise_sigma_hu=(0.001, 0.002), **settings), **options)
    noisy = generate_case(seed, PhantomConfig(noise_sigma_hu=(20.0, 20.001), **settings), **options)
    ct = sitk.GetArrayFromImage(noisy.ct).astype(np.float64)
    return ct - sitk.GetArrayFromImage(quiet.ct), ct


def _block_mean_variance_ratio(noise: np.ndarray, block: int = 8) -> float:
    """Variance of 8x8 in-plane block means over the pixel variance: the share of low-frequency noise power."""
    k, h, w = noise.shape
    blocks = noise[:, : h // block * block, : w // block * block].reshape(k, h // block, block, w // block, block).mean(axis=(2, 4))
    return float(blocks.var() / noise.var())


def test_sharp_kernel_noise_lacks_the_low_frequencies_of_the_smooth_kernel():
    smooth, _ = _noise_of(5, noise_kernels=("smooth",))
    sharp, _ = _noise_of(5, noise_kernels=("sharp",))
    for noise in (smooth, sharp):
        assert 17.0 < noise.std() < 23.0  # the drawn 20 HU (int16 rounding and HU clipping aside)
    # white noise would give 1/64 = 0.016; low-pass noise more, band-pass far less
    assert _block_mean_variance_ratio(smooth) > 0.03
    assert _block_mean_variance_ratio(sharp) < 0.5 * _block_mean_variance_ratio(smooth)
    with pytest.raises(InputError, match="noise kernel"):
        PhantomConfig(noise_kernels=("bone",))


def test_settings_change_only_what_they_model():
    base = generate_case(8, n_nodes=3, n_metastatic=1, tilt=False)
    late = generate_case(8, PhantomConfig(contrast_timing=(1.5, 1.6), aorta_hu=(100.0, 250.0)), n_nodes=3, n_metastatic=1, tilt=False, return_tissue=True)
    assert base.nodes == late.nodes and base.scanner == late.scanner  # same patient, same scanner draws
    ct_base, ct_late = sitk.GetArrayFromImage(base.ct), sitk.GetArrayFromImage(late.ct)
    aorta = sitk.GetArrayFromImage(late.tissue) == TISSUES["aorta"]
    assert aorta.sum() > 100
    assert np.median(ct_late[aorta]) < np.median(ct_base[aorta]) - 30  # delayed phase: the aorta fades
    coarse = generate_case(8, PhantomConfig(node_texture_wavelength_mm=(9.0, 10.0)), n_nodes=3, n_metastatic=1, tilt=False)
    assert [n["short_axis_mm"] for n in coarse.nodes] == [n["short_axis_mm"] for n in base.nodes]  # texture, not size


def test_presets_and_overrides():
    from LymphNodeClassifierLib.phantoms import PRESETS, preset_config

    unseen = preset_config("unseen")
    default = PhantomConfig()
    assert preset_config("default") == default
    for name, value in PRESETS["unseen"].items():
        assert getattr(unseen, name) == tuple(value) and getattr(default, name) != getattr(unseen, name), name
    assert not set(unseen.slice_thickness_choices_mm) & set(default.slice_thickness_choices_mm)  # never seen in training
    with pytest.raises(InputError, match="preset"):
        preset_config("nope")
    with pytest.raises(InputError, match="Unknown phantom setting"):
        PhantomConfig.with_overrides({"noise_sigma": (1, 2)})


def test_command_line_preset_records_its_settings(tmp_path):
    out = tmp_path / "unseen"
    assert main(["--out", str(out), "--cases", "2", "--seed", "4", "--preset", "unseen", "--quiet"]) == 0
    dataset = Dataset.load(out)
    config = dataset.generator["config"]
    assert config["slice_thickness_choices_mm"] == [1.5, 3.75, 4.0] and config["noise_kernels"] == ["sharp", "smooth"]
    for case in dataset.cases:
        assert case.extra["phantom"]["slice_thickness_mm"] in (1.5, 3.75, 4.0)
        assert case.extra["phantom"]["noise_kernel"] in ("sharp", "smooth")


def _aorta_span_hu(config: PhantomConfig) -> tuple[float, float]:
    """The aorta / artery HU a config can render: hi - timing * (hi - lo) +- 15, clipped to aorta_hu,
    arteries up to 15 HU below (scanner._hu_table)."""
    from LymphNodeClassifierLib.phantoms.config import intervals

    low, high = config.aorta_hu
    timings = [t for interval in intervals(config.contrast_timing) for t in interval]
    return (float(np.clip(high - max(timings) * (high - low) - 15.0, low, high)) - 15.0,
            float(np.clip(high - min(timings) * (high - low) + 15.0, low, high)))


def test_randomised_training_preset_never_draws_what_the_unseen_test_preset_draws():
    from LymphNodeClassifierLib.phantoms import PRESETS, preset_config
    from LymphNodeClassifierLib.phantoms.config import intervals

    default, unseen, randomised = PhantomConfig(), preset_config("unseen"), preset_config("randomised")
    assert set(PRESETS["unseen"]) <= set(PRESETS["randomised"])  # none falls back to a default that may overlap (noise does)
    for name in PRESETS["unseen"]:
        train, test = getattr(randomised, name), getattr(unseen, name)
        if name == "slice_thickness_choices_mm":
            assert not set(train) & set(test)
        elif name == "noise_kernels":
            assert set(train) == set(test) == set(phantoms.NOISE_KERNELS)  # shared families; their grain is disjoint
        elif name == "aorta_hu":
            assert _aorta_span_hu(unseen)[1] < _aorta_span_hu(randomised)[0]  # a clip range: compare what it renders
        else:
            for a_low, a_high in intervals(train):
                for b_low, b_high in intervals(test):
                    assert a_high < b_low or b_high < a_low, (name, (a_low, a_high), (b_low, b_high))
        assert train != getattr(default, name), name
    # the class signal is the default's in every preset
    signal = [f for f in PhantomConfig.__dataclass_fields__ if f.startswith(("benign_", "metastatic_", "short_axis", "necrosis", "fatty_hilum"))]
    assert len(signal) >= 12 and all(getattr(c, f) == getattr(default, f) for c in (unseen, randomised) for f in signal)
    # rendered, not only configured: the aorta of delayed-phase unseen studies is below any randomised one
    medians = {}
    for name, config in (("unseen", unseen), ("randomised", randomised)):
        medians[name] = []
        for seed in (1, 2):
            case = generate_case(seed, config, n_nodes=2, n_metastatic=1, spacing_mm=0.9, slice_thickness_mm=5.0, tilt=False, return_tissue=True)
            aorta = sitk.GetArrayFromImage(case.tissue) == TISSUES["aorta"]
            medians[name].append(float(np.median(sitk.GetArrayFromImage(case.ct)[aorta])))
    assert max(medians["unseen"]) < 125 < min(medians["randomised"]), medians


def test_interval_unions_draw_once_in_proportion_to_length():
    from LymphNodeClassifierLib.phantoms.shapes import _u

    union = ((0.0, 1.0), (3.0, 6.0))
    rng, reference = np.random.default_rng(4), np.random.default_rng(4)
    draws = np.array([_u(rng, union) for _ in range(4000)])
    reference.random(4000)
    assert rng.random() == reference.random()  # one draw each, like a plain range
    assert np.all(((draws >= 0) & (draws <= 1)) | ((draws >= 3) & (draws <= 6)))
    assert np.mean(draws <= 1) == pytest.approx(0.25, abs=0.03)  # 1 of 4 mm of total length
    assert np.mean((draws >= 3) & (draws < 4.5)) == pytest.approx(0.375, abs=0.03)  # uniform inside an interval
    assert _u(np.random.default_rng(9), (2.0, 5.0)) == 2.0 + 3.0 * np.random.default_rng(9).random()  # plain ranges as before


def test_command_line_randomised_preset_round_trips_its_unions(tmp_path):
    from LymphNodeClassifierLib.phantoms import preset_config
    from LymphNodeClassifierLib.phantoms.config import intervals

    out = tmp_path / "randomised"
    assert main(["--out", str(out), "--cases", "3", "--seed", "4", "--preset", "randomised", "--quiet"]) == 0
    dataset = Dataset.load(out)
    config = dataset.generator["config"]
    assert PhantomConfig.with_overrides(config) == preset_config("randomised")  # JSON lists back to the preset
    assert "randomised" in dataset.name
    randomised = preset_config("randomised")
    for case in dataset.cases:
        scanner = case.extra["phantom"]
        assert scanner["slice_thickness_mm"] in randomised.slice_thickness_choices_mm
        for key in ("psf_sigma_mm", "noise_sigma_hu", "noise_correlation_px"):
            assert any(low <= scanner[key] <= high for low, high in intervals(getattr(randomised, key))), key


# ---- the bundled sample case ---------------------------------------------------------------------


def test_bundled_sample_case_matches_its_documented_seed(tmp_path):
    sample = Dataset.load(SAMPLE_DIR)
    assert len(sample.cases) == 1
    case = sample.cases[0]
    ct = sitk.ReadImage(str(sample.ct_path(case)))
    labels = sitk.ReadImage(str(sample.labels_path(case)))
    array = sitk.GetArrayFromImage(labels)
    records = sample.nodes_of(case.case_id)
    assert 6 <= len(records) <= 8 and {n.metastatic for n in records} == {0, 1}
    assert sorted(set(np.unique(array)) - {0}) == sorted(n.label_value for n in records)
    assert np.allclose(ct.GetDirection(), np.eye(3).ravel())
    size_bytes = sum(p.stat().st_size for p in SAMPLE_DIR.rglob("*") if p.is_file())
    assert size_bytes < 5e6
    readme = (SAMPLE_DIR / "README.md").read_text()
    assert str(phantoms.SAMPLE_CASE["seed"]) in readme
    # regenerate from the documented options and compare (allow a few voxels of floating-point
    # differences between CPUs / numpy builds)
    again = phantoms.write_sample_dataset(tmp_path / "sample")
    regenerated = again.cases[0]
    ct2 = sitk.ReadImage(str(again.ct_path(regenerated)))
    labels2 = sitk.GetArrayFromImage(sitk.ReadImage(str(again.labels_path(regenerated))))
    assert ct2.GetSize() == ct.GetSize() and np.allclose(ct2.GetOrigin(), ct.GetOrigin()) and np.allclose(ct2.GetSpacing(), ct.GetSpacing())
    a, b = sitk.GetArrayFromImage(ct).astype(int), sitk.GetArrayFromImage(ct2).astype(int)
    assert np.mean(a == b) > 0.999 and np.abs(a - b).max() <= 50
    assert np.mean(array == labels2) > 0.9999
    assert [n.to_dict() for n in records] == [n.to_dict() for n in again.nodes_of(regenerated.case_id)]
    assert json.loads(again.path.read_text())["generator"] == sample.generator
