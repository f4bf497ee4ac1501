"""Test-time augmentation (card option `preprocessing.tta`) and seed ensembles (`model.Ensemble` in
one archive): real torch networks, real TorchScript export and load, a real (tiny) cross-validation.

Independent truths: the TTA average recomputed with numpy's flips / rot90 on the plain network's
outputs; a network made flip- and rotation-invariant by construction (D4-symmetric kernels, global
pooling); an ensemble's logit recomputed as the mean of its members' separately run logits.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from LymphNodeClassifierLib import crossval, gradcam as G, inference, model
from LymphNodeClassifierLib.errors import InputError
from LymphNodeClassifierLib.metrics import binary_metrics
from LymphNodeClassifierLib.patchset import build_patchset
from LymphNodeClassifierLib.phantoms import generate_cohort
from LymphNodeClassifierLib.training import TrainingConfig

SIZE = 24


def make_card(arch: str = "small_resnet", channels: int = 4, size: int = SIZE, tta: str | None = None) -> dict:
    views, mask = {1: ("axial", False), 3: ("triplanar", False), 4: ("triplanar", True)}[channels]
    pre = {
        "window_low": -1000.0, "window_high": 400.0, "window_preset": "custom", "spacing_mm": [0.8] * 3, "patch_size": size,
        "field_of_view_mm": 0.8 * size, "views": views, "mask_channel": mask, "air_hu": -1024.0,
    }
    if tta is not None:
        pre["tta"] = tta
    return model.new_card(architecture=arch, preprocessing=pre, training={"command": "pytest", "seed": 0, "epochs": 1, "dataset": {}}, created="2024-05-01")


def seeded_network(seed: int, arch: str = "small_resnet", channels: int = 4, size: int = SIZE) -> nn.Module:
    torch.manual_seed(seed)
    network = model.build_model(arch, channels, size)
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval mode is not the identity
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return network.eval()


def patches(n: int, seed: int = 0, channels: int = 4, size: int = SIZE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.random((n, channels, size, size)).astype(np.float32)
    if channels == 4:
        x[:, 3] = (x[:, 3] > 0.6).astype(np.float32)  # a binary mask channel
    return x


def numpy_d4(x: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetries of the square on the last two axes, by numpy (not the module's transforms)."""
    rotations = [np.rot90(x, k, axes=(-2, -1)) for k in range(4)]
    return [np.ascontiguousarray(r) for r in rotations] + [np.ascontiguousarray(np.flip(r, -1)) for r in rotations]


def export_and_load(network: nn.Module, card: dict, path) -> model.LoadedModel:
    model.export_torchscript(network, card, path)
    return model.load_model(path)


# --------------------------------------------------------------------------------------------
# TTA


def test_identity_only_tta_equals_no_tta_and_none_is_one_plain_call():
    network = seeded_network(1)
    x = torch.from_numpy(patches(6))
    with torch.no_grad():
        plain = network(x)
        np.testing.assert_array_equal(model.tta_logits(network, x, "none").numpy(), plain.numpy())  # bit for bit
        repeated = model.tta_logits(network, x, ("identity",) * 4)
    np.testing.assert_allclose(repeated.numpy(), plain.numpy(), rtol=0, atol=1e-6)


def test_card_tta_averages_the_plain_networks_logits_over_the_symmetries(tmp_path):
    network = seeded_network(2)
    plain = export_and_load(network, make_card(), tmp_path / "plain.pt")
    augmented = export_and_load(network, make_card(tta="flips+rot90"), tmp_path / "tta.pt")
    assert model.card_tta(plain.card) == "none" and augmented.card["preprocessing"]["tta"] == "flips+rot90"
    x = patches(5, seed=3)
    expected = np.mean([inference.predict_logits(plain, copy_) for copy_ in numpy_d4(x)], axis=0)
    got = inference.predict_logits(augmented, x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    # the flips mode: identity, both flips, rot180 (numpy_d4 indices 0, 4+2 = flip rows, 4 = flip columns, 2)
    copies = numpy_d4(x)
    flips = np.mean([inference.predict_logits(plain, copies[i]) for i in (0, 2, 4, 6)], axis=0)
    np.testing.assert_allclose(inference.predict_logits(augmented, x, tta="flips"), flips, rtol=0, atol=1e-5)
    # a non-invariant network: TTA changes its prediction, and the averaged one is invariant
    assert np.abs(got - inference.predict_logits(plain, x)).max() > 1e-3
    for copy_ in copies[1:]:
        np.testing.assert_allclose(inference.predict_logits(augmented, copy_), got, rtol=0, atol=1e-5)
        assert np.abs(inference.predict_logits(plain, copy_) - inference.predict_logits(plain, x)).max() > 1e-3


class SymmetricNet(nn.Module):
    """Invariant to the square's 8 symmetries by construction: D4-symmetric 3x3 kernels (stride 1,
    zero padding, so the convolution commutes with them), ReLU, global average pooling, linear."""

    def __init__(self, channels: int = 4):
        super().__init__()
        torch.manual_seed(5)
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        with torch.no_grad():
            w = self.conv.weight
            w.copy_(sum(torch.rot90(v, k, (-2, -1)) for v in (w, w.flip(-1)) for k in range(4)) / 8)
        self.fc = nn.Linear(8, 1)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))[:, 0]


def test_a_flip_invariant_network_predicts_the_same_with_and_without_tta():
    network = SymmetricNet().eval()
    x = patches(6, seed=4)
    plain = inference.eager_logits(network, x)
    assert np.abs(plain).max() > 1e-3  # not a constant zero
    for mode in ("flips", "flips+rot90"):
        np.testing.assert_allclose(inference.eager_logits(network, x, mode), plain, rtol=0, atol=1e-5)
    # and the non-invariant small ResNet on the same patches is changed by it
    resnet = seeded_network(6)
    assert np.abs(inference.eager_logits(resnet, x, "flips") - inference.eager_logits(resnet, x)).max() > 1e-3


def test_tta_modes_and_card_values_are_checked():
    with pytest.raises(InputError, match="test-time augmentation"):
        model.check_tta_mode("mirror")
    with pytest.raises(InputError, match="no flips"):
        model.check_tta_fits_training("flips", flips=False, rotation_degrees=180)
    with pytest.raises(InputError, match="at most 30"):
        model.check_tta_fits_training("flips+rot90", flips=True, rotation_degrees=30)
    assert model.check_tta_fits_training("flips", flips=True, rotation_degrees=0) == "flips"
    with pytest.raises(InputError, match="preprocessing.tta"):
        make_card(tta="mirror")


def test_both_bundled_models_have_no_tta_and_predict_as_their_plain_network():
    from LymphNodeClassifierLib.model_registry import bundled_models

    paths = bundled_models()
    assert {"lymph_node_phantom", "lung_nodule_lidc"} <= set(paths)
    for path in paths.values():
        loaded = model.load_model(path)
        assert model.card_tta(loaded.card) == "none"
        size, channels = loaded.patch_size, loaded.in_channels
        x = patches(4, seed=7, channels=channels, size=size)
        with torch.no_grad():
            direct = loaded.module(torch.from_numpy(x)).numpy()
        np.testing.assert_array_equal(inference.predict_logits(loaded, x), direct)


# --------------------------------------------------------------------------------------------
# ensembles


def test_ensemble_archive_reproduces_the_mean_of_its_members(tmp_path):
    members = [seeded_network(seed) for seed in (10, 11, 12)]
    x = patches(7, seed=8)
    member_logits = np.stack([inference.eager_logits(m, x) for m in members])
    in_process = inference.eager_logits(model.Ensemble(members).eval(), x)
    np.testing.assert_allclose(in_process, member_logits.mean(axis=0), rtol=0, atol=1e-6)
    card = make_card()
    card["architecture"]["ensemble"] = {"members": 3}
    loaded = export_and_load(model.Ensemble(members), card, tmp_path / "ensemble.pt")
    assert loaded.card["architecture"]["parameters"] == 3 * model.count_parameters(members[0])
    assert loaded.card["integrity"]["weights_sha256"] == model.weights_digest(loaded.module)
    np.testing.assert_allclose(inference.predict_logits(loaded, x), in_process, rtol=0, atol=1e-5)
    assert np.abs(member_logits - member_logits.mean(axis=0)).max() > 1e-3  # the members differ: a real mean
    # TTA on an ensemble: each member's logits averaged over the copies, then over members
    card["preprocessing"]["tta"] = "flips"
    both = export_and_load(model.Ensemble(members), card, tmp_path / "both.pt")
    expected = np.mean([inference.eager_logits(m, x, "flips") for m in members], axis=0)
    np.testing.assert_allclose(inference.predict_logits(both, x), expected, rtol=0, atol=1e-5)


def test_ensemble_refuses_members_of_different_shapes():
    with pytest.raises(InputError, match="share architecture"):
        model.Ensemble([seeded_network(1), seeded_network(2, channels=3)])
    with pytest.raises(InputError, match="at least one"):
        model.Ensemble([])


@pytest.mark.parametrize("arch", ["small_resnet", "custom_cnn"])
def test_gradcam_of_identical_members_is_the_members_own(tmp_path, arch):
    member = seeded_network(20, arch=arch)
    ensemble = model.Ensemble([member] + [copy.deepcopy(member) for _ in range(2)]).eval()
    x = patches(6, seed=9)
    for target in ("predicted", "metastatic", "benign"):
        cam_member, logit_member = G.gradcam(member, x, target=target, return_logits=True)
        cam_ensemble, logit_ensemble = G.gradcam(ensemble, x, target=target, return_logits=True)
        assert cam_member.max() > 0  # a real map to compare
        np.testing.assert_allclose(cam_ensemble, cam_member, rtol=0, atol=1e-5)
        np.testing.assert_allclose(logit_ensemble, logit_member, rtol=0, atol=1e-6)
    card = make_card(arch=arch)
    card["architecture"]["ensemble"] = {"members": 3}
    loaded = export_and_load(ensemble, card, tmp_path / "same.pt")
    np.testing.assert_allclose(G.gradcam(loaded, x, target="metastatic"), G.gradcam(member, x, target="metastatic"), rtol=0, atol=1e-5)


def test_gradcam_of_different_members_is_relu_of_their_mean_weighted_sum():
    members = [seeded_network(seed) for seed in (30, 31)]
    x = patches(4, seed=10)
    xt = torch.from_numpy(x)
    sums = []
    for m in members:  # each member's Grad-CAM before its ReLU, computed by hand
        fmap = m.features(xt).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(m.head(fmap).sum(), fmap)
        sums.append((grad.mean(dim=(2, 3), keepdim=True) * fmap).sum(dim=1, keepdim=True).detach())
    cam = torch.relu(sum(sums) / 2)
    cam = torch.nn.functional.interpolate(cam, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0]
    cam = cam / cam.amax(dim=(1, 2), keepdim=True)
    got = G.gradcam(model.Ensemble(members).eval(), x, target="metastatic")
    np.testing.assert_allclose(got, cam.numpy(), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# cross-validation --ensemble / --tta

SMALL = dict(patch_size=16, spacing_mm=(2.0, 2.0, 2.0), epochs=2, batch_size=8, patience=2, architecture="resnet", num_threads=1, translation_px=2)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return generate_cohort(tmp_path_factory.mktemp("ens-cohort"), cases=9, seed=11)


def test_crossval_ensemble_with_tta_is_out_of_fold_and_member_zero_is_the_single_run(cohort, tmp_path):
    config = TrainingConfig(**SMALL)
    patchset = build_patchset(cohort, config.patch_spec(), config.window)
    plain = crossval.cross_validate(patchset, config, folds=3, seed=3, inner_val_fraction=0.5, n_boot=20)
    both = crossval.cross_validate(patchset, config, folds=3, seed=3, inner_val_fraction=0.5, n_boot=20, ensemble=2, tta="flips")
    np.testing.assert_array_equal(both.fold, plain.fold)
    logits = both.member_logits
    assert set(logits) == set(model.TTA_MODES) and logits["none"].shape == (2, len(patchset))
    # member 0 without TTA is the plain run's fold model on its own held-out nodes (no other fold's model overwrote them)
    np.testing.assert_allclose(1 / (1 + np.exp(-logits["none"][0].astype(np.float64))), plain.probability, rtol=0, atol=1e-6)
    np.testing.assert_allclose(both.probability, 1 / (1 + np.exp(-logits["flips"].astype(np.float64).mean(axis=0))), rtol=0, atol=1e-12)
    assert np.abs(logits["none"][1] - logits["none"][0]).max() > 1e-4  # the second seed is another network
    variants = {(v["members"], v["tta"]): v for v in both.metrics["ensemble_tta"]["variants"]}
    assert set(variants) == {(m, t) for m in (1, 2) for t in model.TTA_MODES}
    assert variants[(1, "none")]["auc"] == pytest.approx(plain.metrics["auc"], abs=1e-9)
    assert variants[(2, "flips")]["auc"] == pytest.approx(both.metrics["auc"], abs=1e-12)
    assert [len(f["members"]) for f in both.folds] == [2, 2, 2]
    written = crossval.write_crossval(both, tmp_path / "cv")
    rows = (written["metrics.json"].parent / "member_logits.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * len(patchset)
    # --first-member 1: the second seed alone, on the same folds (pooled later by bench/ensemble_tta.py)
    second = crossval.cross_validate(patchset, config, folds=3, seed=3, inner_val_fraction=0.5, n_boot=0, first_member=1)
    for mode in model.TTA_MODES:
        np.testing.assert_allclose(second.member_logits[mode][0], logits[mode][1], rtol=0, atol=1e-6)


def test_crossval_command_exports_an_ensemble_with_tta_whose_card_matches_the_file(cohort, tmp_path):
    out, path = tmp_path / "cv", tmp_path / "ens.pt"
    argv = ["--dataset", str(cohort.folder), "--out", str(out), "--folds", "3", "--patch-size", "16", "--spacing", "2",
            "--epochs", "1", "--batch-size", "8", "--architecture", "resnet", "--translation", "2", "--bootstrap", "20",
            "--inner-val", "0.5", "--quiet", "--ensemble", "2", "--tta", "flips", "--threads", "1", "--export-model", str(path)]
    assert crossval.main(argv) == 0
    loaded = model.load_model(path)
    card = loaded.card
    assert card["architecture"]["ensemble"]["members"] == 2 and card["architecture"]["ensemble"]["seeds"] == [0, 100]
    assert card["preprocessing"]["tta"] == "flips"
    assert card["metrics"]["cross_validation"]["auc"] == json.loads((out / "metrics.json").read_text())["auc"]
    config = TrainingConfig(**{**SMALL, "epochs": 1})
    patchset = build_patchset(cohort, config.patch_spec(), config.window)
    resubstitution = binary_metrics(patchset.y, inference.predict(loaded, patchset.x), card["decision_threshold"])
    assert resubstitution["auc"] == pytest.approx(card["metrics"]["training_set"]["auc"], abs=1e-9)
    assert resubstitution["accuracy"] == pytest.approx(card["metrics"]["training_set"]["accuracy"], abs=1e-9)
    assert math.isfinite(card["decision_threshold"])


def test_crossval_refuses_tta_the_training_never_saw_before_any_work(cohort, tmp_path):
    base = ["--dataset", str(cohort.folder), "--out", str(tmp_path / "cv"), "--patch-size", "16", "--spacing", "2", "--translation", "2"]
    with pytest.raises(InputError, match="no flips"):
        crossval.main(base + ["--tta", "flips", "--no-flips"])
    with pytest.raises(InputError, match="ensemble size"):
        crossval.main(base + ["--ensemble", "0"])
    with pytest.raises(InputError, match="exports nothing"):
        crossval.main(base + ["--first-member", "1", "--export-model", str(tmp_path / "m.pt")])
    assert not (tmp_path / "cv" / "metrics.json").exists()
