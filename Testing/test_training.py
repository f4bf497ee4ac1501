"""Patch sets, patient-level splits, augmentation, training, cancellation, events and export.

The training data are small hand-made datasets written to disk in the dataset format (spheres in
fat: benign = small and homogeneous, metastatic = larger with an enhancing rim and a necrotic
core), so the whole path dataset.json -> images -> nodes -> patches -> model -> card is exercised.
"""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LymphNodeClassifierLib.dataset import Dataset
from LymphNodeClassifierLib.errors import CancelledError, InputError
from LymphNodeClassifierLib.geometry import prepare_label_image
from LymphNodeClassifierLib.inference import predict
from LymphNodeClassifierLib.model import load_model
from LymphNodeClassifierLib.nodes import extract_nodes
from LymphNodeClassifierLib.patches import PatchSpec, extract_patches
from LymphNodeClassifierLib.patchset import build_patchset, data_fingerprint
from LymphNodeClassifierLib.training import (
    TrainingConfig,
    augment_batch,
    export_trained_model,
    main,
    split_by_patient,
    train,
    train_and_export,
    youden_threshold,
)

SIZE = 48  # CT voxels per axis (1 mm)
CENTRES = [(14, 14, 24), (34, 34, 24), (14, 34, 14), (34, 14, 34)]  # (k, j, i)
SMALL = dict(epochs=3, batch_size=16, patience=3)


def make_dataset(folder: Path, n_patients: int, seed: int, nodes_per_case: int = 3, studies: int = 1) -> Dataset:
    rng = np.random.default_rng(seed)
    dataset = Dataset.create(folder, f"handmade-{seed}", generator={"name": "handmade", "seed": seed}, created="2024-01-01T00:00:00+00:00")
    (folder / "images").mkdir(exist_ok=True)
    k, j, i = np.indices((SIZE, SIZE, SIZE)).astype(float)
    for p in range(n_patients):
        for s in range(studies):
            case_id = f"P{p:04d}-S{s + 1}"
            ct = rng.normal(-100, 15, (SIZE,) * 3).astype(np.float32)
            labels = np.zeros((SIZE,) * 3, np.uint16)
            classes = []
            for n in range(nodes_per_case):
                cz, cy, cx = CENTRES[n]
                metastatic = int(rng.integers(0, 2))
                radius = rng.uniform(4.5, 7.0) if metastatic else rng.uniform(3.0, 5.5)
                distance = np.sqrt((k - cz) ** 2 + (j - cy) ** 2 + (i - cx) ** 2)
                inside = distance <= radius
                ct[inside] = (90 if metastatic else 50) + rng.normal(0, 10, inside.sum())
                if metastatic:
                    core = distance <= 0.55 * radius
                    ct[core] = 10 + rng.normal(0, 10, core.sum())
                labels[inside] = 10 * (n + 1)  # label values 10, 20, 30: not 1..n
                classes.append(metastatic)
            for array, kind in ((ct, "ct"), (labels, "labels")):
                image = sitk.GetImageFromArray(array)
                image.SetOrigin((-20.0, 5.0, 100.0))
                sitk.WriteImage(image, str(folder / "images" / f"{case_id}_{kind}.nrrd"), True)
            dataset.add_case(case_id, f"P{p:04d}", f"images/{case_id}_ct.nrrd", f"images/{case_id}_labels.nrrd")
            for n in reversed(range(nodes_per_case)):  # records not in label order
                dataset.add_node(case_id, 10 * (n + 1), classes[n], true_metastatic=classes[n], label_flipped=False)
    dataset.save()
    return dataset


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cohort")
    dataset = make_dataset(folder, n_patients=20, seed=1, studies=2)  # 40 cases, 120 nodes
    config = TrainingConfig(**SMALL)
    return dataset, build_patchset(dataset, config.patch_spec(), config.window)


@pytest.fixture(scope="module")
def trained(cohort):
    _, patchset = cohort
    config = TrainingConfig(epochs=6, batch_size=16, patience=6, seed=3)
    events = []
    result = train(patchset, config, on_event=events.append)
    return config, result, events


# --------------------------------------------------------------------------------------------
# patch sets


def test_patchset_rows_match_their_node_records(cohort):
    dataset, patchset = cohort
    assert len(patchset) == 120 and patchset.x.shape == (120, 3, 64, 64) and patchset.x.dtype == np.float32
    assert patchset.problems == [] and patchset.has_truth and patchset.n_cases == 40
    for row in (0, 1, 2, 100, 119):
        case_id, value = str(patchset.case_ids[row]), int(patchset.label_values[row])
        record = dataset.node(case_id, value)
        assert patchset.y[row] == record.metastatic and patchset.patient_ids[row] == dataset.case(case_id).patient_id
        ct = sitk.ReadImage(str(dataset.ct_path(case_id)))
        labels, _, _ = prepare_label_image(ct, sitk.ReadImage(str(dataset.labels_path(case_id))))
        infos, components = extract_nodes(labels, per_label_value=True)
        info = next(n for n in infos if n.label_value == value)
        patch = extract_patches(ct, components, [info], PatchSpec(), (-135.0, 215.0))[0]
        np.testing.assert_array_equal(patchset.x[row], patch.image)
        assert patchset.short_axis_mm[row] == info.short_axis_mm and patchset.long_axis_mm[row] == info.long_axis_mm
    # the classes are told apart by the images: metastatic nodes have a dark core at the centre
    centre = patchset.x[:, 0, 30:34, 30:34].mean(axis=(1, 2))
    assert centre[patchset.y == 1].mean() < centre[patchset.y == 0].mean() - 0.1


def test_patchset_lists_problems_and_skips_excluded(tmp_path):
    dataset = make_dataset(tmp_path / "d", n_patients=3, seed=2)
    dataset.case("P0001-S1").excluded = True
    dataset.node("P0000-S1", 20).excluded = True
    dataset.node("P0000-S1", 30).metastatic = None
    dataset._nodes.remove(dataset.node("P0002-S1", 10))  # a label value without a record
    del dataset._node_index[("P0002-S1", 10)]
    dataset._nodes_by_case["P0002-S1"] = [n for n in dataset._nodes_by_case["P0002-S1"] if n.label_value != 10]
    dataset.add_node("P0002-S1", 77, 1)  # a record without voxels
    dataset.save()
    patchset = build_patchset(Dataset.load(tmp_path / "d"), PatchSpec(), (-135, 215))
    keys = set(zip(patchset.case_ids.tolist(), patchset.label_values.tolist()))
    assert keys == {("P0000-S1", 10), ("P0002-S1", 20), ("P0002-S1", 30)}
    assert len(patchset.problems) == 3
    text = "\n".join(patchset.problems)
    assert "label value 10 has no node record" in text and "node 77 has no voxels" in text and "not labelled" in text


def test_missing_image_is_an_input_error(tmp_path):
    dataset = make_dataset(tmp_path / "d", n_patients=2, seed=2)
    dataset.ct_path("P0001-S1").unlink()
    with pytest.raises(InputError, match="P0001-S1.*exclude the case"):
        build_patchset(dataset, PatchSpec(), (-135, 215))


def test_patchset_cache_is_reused_and_invalidated_by_a_relabel(tmp_path):
    dataset = make_dataset(tmp_path / "d", n_patients=3, seed=4)
    spec, window = PatchSpec(views="axial", mask_channel=True), (-135.0, 215.0)
    first = build_patchset(dataset, spec, window, cache_dir=tmp_path / "cache")
    assert not first.from_cache and len(list((tmp_path / "cache").glob("*.npz"))) == 1
    again = build_patchset(Dataset.load(tmp_path / "d"), spec, window, cache_dir=tmp_path / "cache")
    assert again.from_cache and again.fingerprint == first.fingerprint
    assert again.generator == first.generator == {"name": "handmade", "seed": 4}
    for name in ("x", "y", "patient_ids", "case_ids", "label_values", "short_axis_mm", "true_y"):
        np.testing.assert_array_equal(getattr(again, name), getattr(first, name))
    assert data_fingerprint(dataset, PatchSpec(), window) != first.fingerprint  # spec is part of the key
    dataset.node("P0000-S1", 10).metastatic = 1 - dataset.node("P0000-S1", 10).metastatic
    dataset.save()
    relabelled = build_patchset(Dataset.load(tmp_path / "d"), spec, window, cache_dir=tmp_path / "cache")
    assert not relabelled.from_cache and relabelled.fingerprint != first.fingerprint
    assert (relabelled.y != first.y).sum() == 1


def test_patchset_with_two_workers_equals_one(tmp_path):
    dataset = make_dataset(tmp_path / "d", n_patients=4, seed=5)
    one = build_patchset(dataset, PatchSpec(), (-135, 215))
    two = build_patchset(dataset, PatchSpec(), (-135, 215), workers=2)
    np.testing.assert_array_equal(one.x, two.x)
    np.testing.assert_array_equal(one.label_values, two.label_values)


# --------------------------------------------------------------------------------------------
# patient-level split


def test_split_by_patient_property_over_random_cohorts():
    rng = np.random.default_rng(0)
    worst = 0.0
    for trial in range(100):
        n_patients = int(rng.integers(30, 200))
        nodes = rng.integers(1, 7, size=n_patients)
        patients = np.repeat([f"P{p}" for p in range(n_patients)], nodes)
        y = (rng.random(patients.size) < rng.uniform(0.15, 0.6)).astype(int)
        train_idx, val_idx, test_idx = split_by_patient(patients, y, (0.8, 0.1, 0.1), seed=trial)
        every = np.concatenate([train_idx, val_idx, test_idx])
        assert np.array_equal(np.sort(every), np.arange(patients.size)), "every node used exactly once"
        groups = [set(patients[idx]) for idx in (train_idx, val_idx, test_idx)]
        assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2]), "a patient in two splits"
        for idx, target in ((val_idx, 0.1), (test_idx, 0.1), (train_idx, 0.8)):
            worst = max(worst, abs(idx.size / patients.size - target))
        assert abs(test_idx.size / patients.size - 0.1) < 0.06 and abs(val_idx.size / patients.size - 0.1) < 0.06
    assert worst < 0.06


def test_split_is_reproducible_stratified_and_checks_input():
    rng = np.random.default_rng(1)
    patients = np.repeat(np.arange(200), 3)
    y = (rng.random(600) < 0.3).astype(int)
    first = split_by_patient(patients, y, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(first, split_by_patient(patients, y, seed=5)))
    assert not all(np.array_equal(a, b) for a, b in zip(first, split_by_patient(patients, y, seed=6)))
    for idx in first:
        assert abs(y[idx].mean() - y.mean()) < 0.1
    train_idx, val_idx, test_idx = split_by_patient(patients, y, (0.9, 0.1, 0.0))
    assert test_idx.size == 0 and train_idx.size + val_idx.size == 600
    with pytest.raises(InputError, match="only 5 patients"):
        split_by_patient(np.arange(5), np.array([0, 1, 0, 1, 0]))
    with pytest.raises(InputError, match="add up to 1"):
        split_by_patient(patients, y, (0.8, 0.1, 0.2))
    with pytest.raises(InputError, match="one patient id per node"):
        split_by_patient(patients[:-1], y)


# --------------------------------------------------------------------------------------------
# augmentation


def _asymmetric(n=2, channels=3, size=64):
    x = torch.zeros((n, channels, size, size))
    x[:, :, 10:20, 30:50] = 1.0  # a bar in the top half
    x[:, :, 40:44, 8:12] = 0.5
    return x


def test_rotation_and_shift_follow_the_documented_directions_with_air_padding():
    config = TrainingConfig(flips=False)
    x = _asymmetric()
    g = torch.Generator().manual_seed(0)
    rotated = augment_batch(x, g, config, angles_deg=torch.tensor([90.0, -90.0]), shifts_px=torch.zeros(2, 2))
    torch.testing.assert_close(rotated[0], torch.rot90(x[0], 1, dims=(-2, -1)), atol=1e-5, rtol=0)  # counter-clockwise
    torch.testing.assert_close(rotated[1], torch.rot90(x[1], -1, dims=(-2, -1)), atol=1e-5, rtol=0)
    shifted = augment_batch(x, g, config, angles_deg=torch.zeros(2), shifts_px=torch.tensor([[10.0, 0.0], [0.0, -10.0]]))
    expected = torch.zeros_like(x)
    expected[0, :, :, 10:] = x[0, :, :, :-10]  # right by 10 columns, air (0) enters on the left
    expected[1, :, :-10, :] = x[1, :, 10:, :]  # up by 10 rows
    torch.testing.assert_close(shifted, expected, atol=1e-5, rtol=0)
    ones = augment_batch(torch.ones(1, 1, 64, 64), g, config, angles_deg=torch.tensor([45.0]), shifts_px=torch.zeros(1, 2))
    assert ones[0, 0, 0, 0] == 0.0 and ones[0, 0, 32, 32] == pytest.approx(1.0)  # corners padded with air


def test_random_augmentation_is_seeded_and_keeps_the_mask_binary():
    config = TrainingConfig(mask_channel=True, rotation_degrees=30, translation_px=5)
    x = _asymmetric(n=8, channels=4)
    a = augment_batch(x, torch.Generator().manual_seed(3), config)
    b = augment_batch(x, torch.Generator().manual_seed(3), config)
    c = augment_batch(x, torch.Generator().manual_seed(4), config)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, c) and not torch.equal(a, x)
    assert set(torch.unique(a[:, -1]).tolist()) <= {0.0, 1.0}
    still = augment_batch(x, torch.Generator(), TrainingConfig(flips=False, rotation_degrees=0, translation_px=0))
    assert torch.equal(still, x)


# --------------------------------------------------------------------------------------------
# training


def test_appearance_augmentation_off_draws_nothing_and_on_changes_only_the_image_channels():
    from LymphNodeClassifierLib.training import augment_appearance

    x = torch.full((64, 4, 24, 24), 0.5)
    x[:, -1] = (torch.rand(64, 24, 24) > 0.5).float()  # a mask channel
    generator = torch.Generator().manual_seed(1)
    state = generator.get_state()
    assert augment_appearance(x, generator, TrainingConfig(mask_channel=True)) is x
    assert torch.equal(generator.get_state(), state)  # no draws: runs without it stay identical
    config = TrainingConfig(mask_channel=True, intensity_jitter=0.1, blur_sigma_px=2.0, noise_std=0.04)
    out = augment_appearance(x, generator, config)
    assert torch.equal(out[:, -1], x[:, -1]) and out.min() >= 0 and out.max() <= 1
    # intensity only: a constant image stays constant per node, within 0.5 * (1 +- j) +- j
    levels = augment_appearance(x, generator, TrainingConfig(intensity_jitter=0.1))[:, :3]
    assert torch.allclose(levels, levels[:, :1, :1, :1].expand_as(levels))
    assert levels.min() >= 0.5 * 0.9 - 0.1 - 1e-6 and levels.max() <= 0.5 * 1.1 + 0.1 + 1e-6 and levels.std() > 0.01
    # noise only: std uniform in [0, s] per node, so the mean variance is s^2 / 3
    noise = augment_appearance(x, generator, TrainingConfig(noise_std=0.06))[:, :3] - 0.5
    assert float(noise.var()) == pytest.approx(0.06 ** 2 / 3, rel=0.2)


def test_blur_augmentation_keeps_the_mass_and_spreads_an_impulse():
    from LymphNodeClassifierLib.training import augment_appearance

    x = torch.zeros((8, 3, 33, 33))
    x[:, :, 16, 16] = 1.0
    out = augment_appearance(x, torch.Generator().manual_seed(0), TrainingConfig(blur_sigma_px=3.0, translation_px=0.0))
    assert torch.allclose(out.sum(dim=(2, 3)), torch.ones(8, 3), atol=1e-5)  # a normalised kernel
    assert (out[:, :, 16, 16] < 1.0).all()  # every node blurred (sigma > 0 almost surely)
    assert torch.allclose(out, out.flip(-1), atol=1e-6) and torch.allclose(out, out.transpose(-1, -2), atol=1e-6)  # isotropic
    with pytest.raises(InputError, match="blur"):
        TrainingConfig(blur_sigma_px=-1)


def _lag1_correlation(noise: torch.Tensor) -> torch.Tensor:
    """Per node: correlation of horizontally adjacent pixels (mean over channels)."""
    a, b = noise[..., :, :-1], noise[..., :, 1:]
    a, b = a - a.mean(dim=(2, 3), keepdim=True), b - b.mean(dim=(2, 3), keepdim=True)
    return ((a * b).mean(dim=(2, 3)) / (a.std(dim=(2, 3)) * b.std(dim=(2, 3)))).mean(dim=1)


def test_noise_grain_correlates_the_noise_like_a_ct_kernel_and_keeps_its_level():
    from LymphNodeClassifierLib.training import augment_appearance

    x = torch.full((64, 3, 48, 48), 0.5)
    white = augment_appearance(x, torch.Generator().manual_seed(2), TrainingConfig(noise_std=0.06)) - 0.5
    grainy = augment_appearance(x, torch.Generator().manual_seed(2), TrainingConfig(noise_std=0.06, noise_grain_px=3.0)) - 0.5
    # the level is the drawn std either way (uniform in [0, s]: mean variance s^2 / 3)
    assert float(white.var()) == pytest.approx(0.06 ** 2 / 3, rel=0.2) and float(grainy.var()) == pytest.approx(0.06 ** 2 / 3, rel=0.2)
    white_r, grainy_r = _lag1_correlation(white), _lag1_correlation(grainy)
    assert white_r.abs().max() < 0.1
    # Gaussian-smoothed white noise of sigma s has lag-1 correlation exp(-1 / (4 s^2)); s is uniform in [0, 3] per node
    assert grainy_r.max() <= np.exp(-1 / (4 * 3.0 ** 2)) + 0.05 and float(grainy_r.mean()) > 0.5
    assert float(grainy_r.std()) > 0.05  # a grain per node, not one for the batch
    with pytest.raises(InputError, match="noise grain needs noise"):
        TrainingConfig(noise_grain_px=1.0)


def test_zoom_scales_about_the_patch_centre_and_off_draws_nothing():
    size = 64
    rows, cols = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    disc = (((rows - size / 2) ** 2 + (cols - size / 2) ** 2) <= 8.0 ** 2).float()
    x = disc.expand(3, 1, size, size).clone()
    config = TrainingConfig(flips=False, rotation_degrees=0, translation_px=0, zoom_jitter=0.3)
    out = augment_batch(x, torch.Generator(), config, zooms=torch.tensor([1.0, 1.5, 0.5]))
    area = out[:, 0].sum(dim=(1, 2))
    torch.testing.assert_close(out[0], x[0], atol=1e-5, rtol=0)
    assert float(area[1] / area[0]) == pytest.approx(1.5 ** 2, rel=0.05) and float(area[2] / area[0]) == pytest.approx(0.5 ** 2, rel=0.1)
    for node in out[:, 0]:  # still centred
        centre_r, centre_c = (float((node * grid).sum() / node.sum()) for grid in (rows, cols))
        assert centre_r == pytest.approx(size / 2, abs=0.05) and centre_c == pytest.approx(size / 2, abs=0.05)
    randomly = augment_batch(disc.expand(200, 1, size, size).clone(), torch.Generator().manual_seed(5), config)[:, 0].sum(dim=(1, 2))
    ratio = randomly / area[0]
    assert float(ratio.min()) >= 0.7 ** 2 - 0.05 and float(ratio.max()) <= 1.3 ** 2 + 0.05 and float(ratio.std()) > 0.15
    # off: only the angle and shift draws of earlier versions, so their runs keep their random streams
    generator, reference = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(augment_batch(x, generator, TrainingConfig(flips=False, rotation_degrees=0, translation_px=0)), x)
    torch.rand(3, generator=reference), torch.rand((3, 2), generator=reference)
    assert torch.equal(generator.get_state(), reference.get_state())
    with pytest.raises(InputError, match="zoom"):
        TrainingConfig(zoom_jitter=0.9)


def test_short_training_learns(trained, cohort):
    config, result, _ = trained
    assert result.metrics["validation"]["auc"] > 0.8
    assert result.metrics["test"]["auc"] > 0.8
    assert 1 <= result.best_epoch <= result.epochs_run == 6
    assert result.history[result.best_epoch - 1]["val_loss"] == min(h["val_loss"] for h in result.history)
    val = result.splits["validation"]
    threshold, _ = youden_threshold(cohort[1].y[val], result.probabilities["validation"])
    assert result.decision_threshold == threshold
    ci = result.metrics["test"]["ci95"]["auc"]
    assert ci[0] <= result.metrics["test"]["auc"] <= ci[1]


def test_events_are_json_and_ordered(trained):
    config, result, events = trained
    for event in events:
        json.dumps(event, allow_nan=False)
    kinds = [e["event"] for e in events]
    assert kinds == ["start"] + ["epoch"] * result.epochs_run + ["done"]
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, result.epochs_run + 1))
    for e in epochs:
        assert set(e) >= {"epoch", "epochs", "train_loss", "val_loss", "val_auc", "lr", "seconds"} and e["epochs"] == config.epochs
    assert events[-1]["best_epoch"] == result.best_epoch


def test_training_is_deterministic_for_a_seed_and_leaves_global_rng_alone(cohort):
    _, patchset = cohort
    config = TrainingConfig(**{**SMALL, "epochs": 2}, seed=11)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = train(patchset, config)
    assert torch.equal(torch.get_rng_state(), before)
    b = train(patchset, config)
    assert [h["val_loss"] for h in a.history] == [h["val_loss"] for h in b.history]
    np.testing.assert_array_equal(a.probabilities["test"], b.probabilities["test"])
    c = train(patchset, TrainingConfig(**{**SMALL, "epochs": 2, "seed": 12}))
    assert [h["val_loss"] for h in a.history] != [h["val_loss"] for h in c.history]


def test_lr_is_halved_on_plateau_and_early_stopping_stops(cohort):
    _, patchset = cohort
    # a learning rate of ~0 cannot lower the validation loss: LR halves, then training stops early
    config = TrainingConfig(epochs=30, batch_size=64, learning_rate=1e-12, patience=3, lr_patience=1, seed=0,
                            rotation_degrees=0, translation_px=0, flips=False)
    result = train(patchset, config)
    lrs = [h["lr"] for h in result.history]
    assert result.stopped_early and result.epochs_run == 4 and result.best_epoch == 1
    assert any(later == pytest.approx(earlier / 2) for earlier, later in zip(lrs, lrs[1:]))


def test_num_threads_is_applied_and_restored(cohort):
    _, patchset = cohort
    before = torch.get_num_threads()
    seen = []
    train(patchset, TrainingConfig(**{**SMALL, "epochs": 1}, num_threads=1), on_event=lambda e: seen.append(torch.get_num_threads()))
    assert set(seen) == {1} and torch.get_num_threads() == before


def test_cancellation_raises_and_leaves_the_model_file_alone(cohort, tmp_path):
    _, patchset = cohort
    path = tmp_path / "model.pt"
    path.write_bytes(b"the user's previous model")
    calls = []

    def cancel_after_five():
        calls.append(1)
        return len(calls) > 5

    events = []
    with pytest.raises(CancelledError):
        train_and_export(patchset, TrainingConfig(**SMALL), path, "test", on_event=events.append, is_cancelled=cancel_after_five)
    assert path.read_bytes() == b"the user's previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary file left
    assert [e["event"] for e in events] == ["start"]  # cancelled inside the first epoch
    with pytest.raises(CancelledError):
        train(patchset, TrainingConfig(**SMALL), is_cancelled=lambda: True)
    assert not (tmp_path / "other.pt").exists()


def test_bad_configuration_and_data_are_input_errors(cohort):
    _, patchset = cohort
    with pytest.raises(InputError, match="architecture"):
        TrainingConfig(architecture="vgg")
    with pytest.raises(InputError, match="rotation"):
        TrainingConfig(rotation_degrees=270)
    with pytest.raises(InputError, match="batch size"):
        TrainingConfig(batch_size=0)
    with pytest.raises(InputError, match="patch spec"):
        train(patchset, TrainingConfig(views="axial"))
    with pytest.raises(InputError, match="both classes"):
        only_benign = patchset.subset(np.flatnonzero(patchset.y == 0))
        train(only_benign, TrainingConfig(**SMALL))
    assert TrainingConfig(architecture="small_resnet").architecture == "resnet"


def test_exported_card_is_complete_and_matches_the_config(trained, cohort, tmp_path):
    config, result, _ = trained
    _, patchset = cohort
    path = export_trained_model(result, patchset.summary(), config, tmp_path / "m.pt", "python -m LymphNodeClassifierLib train --dataset X")
    loaded = load_model(path)
    card = loaded.card
    assert card["preprocessing"] == config.preprocessing()
    assert card["preprocessing"]["window_low"] == -135.0 and card["preprocessing"]["window_preset"] == "abdomen"
    assert card["preprocessing"]["channels"] == ["axial", "coronal", "sagittal"] and card["preprocessing"]["field_of_view_mm"] == pytest.approx(64 * 0.79)
    assert card["architecture"]["name"] == "custom_cnn" and card["architecture"]["parameters"] > 0
    assert card["decision_threshold"] == pytest.approx(result.decision_threshold)
    training = card["training"]
    assert training["command"].startswith("python -m LymphNodeClassifierLib train")
    assert training["seed"] == 3 and training["epochs"] == result.epochs_run
    assert training["dataset"]["fingerprint"] == patchset.fingerprint and len(patchset.fingerprint) == 64
    assert training["dataset"]["nodes"] == 120 and training["dataset"]["cases"] == 40
    assert training["dataset"]["metastatic"] + training["dataset"]["benign"] == 120
    assert card["metrics"]["validation"]["auc"] == pytest.approx(result.metrics["validation"]["auc"])
    assert card["metrics"]["test"]["n"] == result.splits["test"].size and card["metrics"]["held_out"] == {}
    assert card["created"] and card["model_version"]
    # the file reproduces the eager model
    probability = predict(loaded, patchset.x[:20])
    from LymphNodeClassifierLib.training import predict_probabilities

    np.testing.assert_allclose(probability, predict_probabilities(result.model, patchset.x[:20]), atol=1e-5)


def test_resnet_axial_with_mask_trains_and_exports(tmp_path):
    dataset = make_dataset(tmp_path / "d", n_patients=20, seed=8)
    config = TrainingConfig(architecture="resnet", views="axial", mask_channel=True, epochs=2, batch_size=16)
    patchset = build_patchset(dataset, config.patch_spec(), config.window)
    assert patchset.x.shape[1] == 2
    result, _ = train_and_export(patchset, config, tmp_path / "r.pt", "test")
    card = load_model(tmp_path / "r.pt").card
    assert card["architecture"]["name"] == "small_resnet" and card["preprocessing"]["channels"] == ["axial", "mask"]


# --------------------------------------------------------------------------------------------
# command line


def test_cli_trains_with_held_out_set_and_reports_bad_input_in_one_line(tmp_path, capsys):
    make_dataset(tmp_path / "train", n_patients=20, seed=20)
    make_dataset(tmp_path / "held", n_patients=6, seed=21)
    out = tmp_path / "models" / "m.pt"
    argv = ["--dataset", str(tmp_path / "train"), "--out", str(out), "--epochs", "3", "--batch-size", "16",
            "--seed", "2", "--cache", str(tmp_path / "cache"), "--held-out", str(tmp_path / "held"),
            "--data-command", "make_dataset train", "--data-command", "make_dataset held"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("\nepoch ") + printed.startswith("epoch ") == 3 and "held-out handmade-21" in printed
    card = load_model(out).card
    held = card["metrics"]["held_out"]["handmade-21"]
    assert held["n"] == 18 and "size_rule_auc" in held and "auc_vs_truth" in held
    assert card["training"]["command"] == "python -m LymphNodeClassifierLib train " + shlex.join(argv)
    assert card["training"]["data_commands"] == ["make_dataset train", "make_dataset held"]
    assert card["training"]["dataset"]["generator"] == {"name": "handmade", "seed": 20}

    assert main(["--dataset", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and not (tmp_path / "x.pt").exists()
    assert main(["--dataset", str(tmp_path / "train")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["--dataset", str(tmp_path / "train"), "--out", str(tmp_path / "x.pt"), "--epochs", "0"]) == 2


def test_cli_entry_point_dispatches_train(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "LymphNodeClassifierLib", "train", "--dataset", str(tmp_path), "--out", str(tmp_path / "m.pt")],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent / "LymphNodeClassifier", timeout=120,
    )
    assert completed.returncode == 2 and completed.stderr.startswith("error: There is no dataset.json")
