"""Image + node-feature fusion (fusion.py, model.FusedNetwork): training, the TorchScript archive,
inference through the pipeline, the card checks and Grad-CAM.

Independent truths: scikit-learn's own pipeline for the feature model, numpy float64 for the mean
of two probabilities, an explicit linear layer on the concatenated vector for `concat`,
`node_features.feature_matrix` (the training path) for the features the pipeline computes, and
the image branch exported on its own for Grad-CAM. Real torch, SimpleITK and phantom CTs.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from LymphNodeClassifierLib import crossval
from LymphNodeClassifierLib.errors import InputError
from LymphNodeClassifierLib.fusion import attach_features, fit_feature_logistic, predict_fused, standardisation
from LymphNodeClassifierLib.gradcam import gradcam
from LymphNodeClassifierLib.inference import predict
from LymphNodeClassifierLib.model import (
    CARD_FILE_NAME, FusedNetwork, build_model, export_torchscript, load_model, validate_card,
)
from LymphNodeClassifierLib.node_features import FEATURE_NAMES, feature_matrix
from LymphNodeClassifierLib.patchset import build_patchset
from LymphNodeClassifierLib.phantoms import generate_cohort
from LymphNodeClassifierLib.pipeline import classify_images
from LymphNodeClassifierLib.training import TrainingConfig, build_card, train
from LymphNodeClassifierLib.validate import read_case

F = len(FEATURE_NAMES)


def small_config(fusion: str) -> TrainingConfig:
    return TrainingConfig(architecture="resnet", mask_channel=True, patch_size=16, spacing_mm=(2.0,) * 3, epochs=2, batch_size=8,
                          translation_px=2, num_threads=1, fusion=fusion, split_fractions=(0.6, 0.2, 0.2))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    dataset = generate_cohort(tmp_path_factory.mktemp("fusion") / "cohort", cases=8, seed=11)
    config = small_config("mean")
    patchset = build_patchset(dataset, config.patch_spec(), config.window)
    attach_features(dataset, patchset, config)
    return {"dataset": dataset, "patchset": patchset}


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    """One training per fusion mode on the phantom cohort, exported; plus the plain run (fusion none)."""
    folder = tmp_path_factory.mktemp("fusion-models")
    out = {}
    for mode in ("none", "mean", "concat"):
        config = small_config(mode)
        result = train(cohort["patchset"], config)
        card = build_card(result, cohort["patchset"].summary(), config, f"test --fusion {mode}")
        path = export_torchscript(result.model, card, folder / f"{mode}.pt")
        out[mode] = {"result": result, "config": config, "path": path, "card": card}
    return out


def synthetic_features(n=200, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, F)) * rng.uniform(0.5, 30, F) + rng.uniform(-50, 50, F)
    y = (x[:, 0] / x[:, 0].std() + 0.5 * rng.normal(size=n) > 0).astype(np.int64)
    x[rng.random(x.shape) < 0.05] = np.nan  # unmeasured features: imputed by the training medians
    groups = np.repeat(np.arange(n // 2), 2).astype(str)
    return x, y, groups


# --------------------------------------------------------------------------------------------
# the network's arithmetic


def test_feature_branch_reproduces_scikit_learn():
    x, y, groups = synthetic_features()
    fitted = fit_feature_logistic(x[:150], y[:150], groups[:150])
    reference = make_pipeline(SimpleImputer(strategy="median"), StandardScaler(), LogisticRegression(C=fitted["C"], max_iter=5000))
    expected = reference.fit(x[:150], y[:150]).predict_proba(x[150:])[:, 1]
    network = FusedNetwork(build_model("small_resnet", 4, 16), "mean", fitted["median"], fitted["mean"], fitted["scale"],
                           fitted["coef"], fitted["intercept"]).eval()
    got = torch.sigmoid(network.feature_logit(torch.from_numpy(x[150:]).float())).double().numpy()
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert fitted["C"] in np.logspace(-3, 1, 9)


def test_mean_fusion_is_the_mean_of_the_two_probabilities_even_when_saturated():
    torch.manual_seed(0)
    network = FusedNetwork(build_model("small_resnet", 4, 16), "mean", np.zeros(F), np.zeros(F), np.ones(F), torch.randn(F) * 3, 0.0).eval()
    x, features = torch.rand(6, 4, 16, 16), torch.randn(6, F) * 8  # feature logits up to ~+-100
    with torch.no_grad():
        a = network(x).double().numpy()
        b = network.feature_logit(features).double().numpy()
        fused = network.fused(x, features).double().numpy()
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
    np.testing.assert_allclose(sig(fused), (sig(a) + sig(b)) / 2.0, rtol=1e-5, atol=1e-7)
    assert np.isfinite(fused).all()


def test_concat_is_the_final_linear_layer_on_the_concatenated_features():
    torch.manual_seed(1)
    median, mean, scale = np.full(F, 3.0), np.linspace(-2, 2, F), np.linspace(0.5, 4, F)
    network = FusedNetwork(build_model("small_resnet", 4, 16), "concat", median, mean, scale, torch.randn(F)).eval()
    x, raw = torch.rand(5, 4, 16, 16), torch.randn(5, F) * 2
    raw[1, 3] = float("nan")
    with torch.no_grad():
        pooled = torch.flatten(network.image.pool(network.image.features(x)), 1)
        z = (torch.where(torch.isnan(raw), torch.tensor(3.0), raw) - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(scale, dtype=torch.float32)
        weight = torch.cat([network.image.fc.weight[0], network.feature_weight])[None, :]
        expected = torch.nn.functional.linear(torch.cat([pooled, z], dim=1), weight, network.image.fc.bias)[:, 0]
        np.testing.assert_allclose(network.fused(x, raw).numpy(), expected.numpy(), atol=1e-5)


# --------------------------------------------------------------------------------------------
# training and the exported archive


@pytest.mark.parametrize("mode", ["mean", "concat"])
def test_exported_archive_reproduces_the_training_probabilities(cohort, trained, mode):
    run = trained[mode]
    result, patchset = run["result"], cohort["patchset"]
    loaded = load_model(run["path"])
    assert loaded.card["preprocessing"]["node_features"] == {"fusion": mode, "names": list(FEATURE_NAMES), "version": "1"}
    for split in ("validation", "test"):
        rows = result.splits[split]
        fused, image = predict_fused(loaded, patchset.x[rows], patchset.node_features[rows])
        np.testing.assert_allclose(fused, result.probabilities[split], rtol=0, atol=1e-6)
        np.testing.assert_allclose(image, result.probabilities[f"{split}_image"], rtol=0, atol=1e-6)
        # forward() stays the image branch: what inference.predict returns for the file
        np.testing.assert_allclose(predict(loaded, patchset.x[rows]), image, rtol=0, atol=1e-6)


def test_mean_fusion_keeps_the_plain_cnn_and_fits_the_features_on_the_training_part_only(cohort, trained):
    patchset = cohort["patchset"]
    plain, fused = trained["none"]["result"], trained["mean"]["result"]
    for split in ("validation", "test"):  # same seed, same draws: the image branch IS the plain CNN
        np.testing.assert_array_equal(fused.probabilities[f"{split}_image"], plain.probabilities[split])
    rows = fused.splits["train"]
    refit = fit_feature_logistic(patchset.node_features[rows], patchset.y[rows], patchset.patient_ids[rows], seed=fused.config.seed)
    np.testing.assert_allclose(fused.model.feature_weight.detach().numpy(), refit["coef"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused.model.feature_median.numpy(), refit["median"], rtol=1e-6)


def test_concat_standardises_with_the_training_part(cohort, trained):
    patchset, result = cohort["patchset"], trained["concat"]["result"]
    expected = standardisation(patchset.node_features[result.splits["train"]])
    np.testing.assert_allclose(result.model.feature_mean.numpy(), expected["mean"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(result.model.feature_scale.numpy(), expected["scale"], rtol=1e-6, atol=1e-6)
    assert result.model.feature_weight.detach().abs().sum() > 0  # trained jointly (it starts at zero)


def test_training_without_features_is_refused_in_one_line(cohort):
    patchset = copy.copy(cohort["patchset"])
    patchset.node_features = None
    with pytest.raises(InputError, match="needs the node features") as error:
        train(patchset, small_config("concat"))
    assert "\n" not in str(error.value)


def test_crossval_fusion_writes_both_probabilities(cohort, tmp_path):
    out = tmp_path / "cv"
    code = crossval.main(["--dataset", str(cohort["dataset"].folder), "--out", str(out), "--folds", "2", "--inner-val", "0.5", "--architecture", "resnet", "--mask-channel",
                          "--patch-size", "16", "--spacing", "2", "--epochs", "1", "--batch-size", "8", "--translation", "2",
                          "--threads", "1", "--bootstrap", "0", "--fusion", "mean", "--quiet"])
    assert code == 0
    header = (out / "predictions.csv").read_text().splitlines()[0].split(",")
    assert header[-1] == "image_probability" and "probability" in header
    assert json.loads((out / "metrics.json").read_text())["config"]["fusion"] == "mean"


# --------------------------------------------------------------------------------------------
# inference through the pipeline


def test_pipeline_features_equal_the_training_features_and_the_fused_probabilities(cohort, trained):
    dataset, patchset = cohort["dataset"], cohort["patchset"]
    loaded = load_model(trained["concat"]["path"])
    case = next(c for c in dataset.cases if not c.excluded)
    checked = read_case(dataset.ct_path(case), dataset.labels_path(case))
    result = classify_images(checked.ct, checked.labels_on_ct, loaded, with_gradcam=False, per_label_value=case.per_label_value)
    values = [node.label_value for node in result.nodes]
    expected = feature_matrix(dataset, [case.case_id] * len(values), values)
    np.testing.assert_array_equal(result.node_features, expected)
    rows = [int(np.flatnonzero((patchset.case_ids == case.case_id) & (patchset.label_values == v))[0]) for v in values]
    fused, image = predict_fused(loaded, patchset.x[rows], patchset.node_features[rows])
    np.testing.assert_allclose(result.probabilities, fused, atol=1e-6)
    np.testing.assert_allclose(result.image_probabilities, image, atol=1e-6)
    assert not np.allclose(result.probabilities, result.image_probabilities)  # the features do change the output


def test_image_only_model_has_no_features_in_the_pipeline(cohort, trained):
    dataset = cohort["dataset"]
    case = next(c for c in dataset.cases if not c.excluded)
    checked = read_case(dataset.ct_path(case), dataset.labels_path(case))
    result = classify_images(checked.ct, checked.labels_on_ct, load_model(trained["none"]["path"]), with_gradcam=False,
                             per_label_value=case.per_label_value)
    assert result.image_probabilities is None and result.node_features is None


# --------------------------------------------------------------------------------------------
# card / network mismatches


def _save_without_integrity(network: torch.nn.Module, card: dict, path):
    """An archive as an older exporter (no integrity block) would write it: only the load checks stand."""
    card = copy.deepcopy(card)
    card.pop("integrity", None)
    torch.jit.save(torch.jit.script(network.eval()), str(path), _extra_files={CARD_FILE_NAME: json.dumps(validate_card(card))})
    return path


def test_a_card_that_does_not_fit_the_fused_network_is_refused_in_one_line(trained, tmp_path):
    run = trained["concat"]
    network, card = run["result"].model, run["card"]
    plain_card = copy.deepcopy(card)
    plain_card["preprocessing"].pop("node_features")
    cases = {
        "fused network, card without features": (network, plain_card, "lists none"),
        "card with features, plain network": (network.image, card, "no 'fused' method"),
        "card with 22 features, network with 5": (FusedNetwork(copy.deepcopy(network.image), "concat", np.zeros(5), np.zeros(5), np.ones(5)),
                                                 card, "refuses them"),
    }
    for name, (module, module_card, message) in cases.items():
        path = _save_without_integrity(module, module_card, tmp_path / f"{len(name)}.pt")
        with pytest.raises(InputError, match=message) as error:
            load_model(path)
        assert "\n" not in str(error.value), name
    other_version = copy.deepcopy(card)
    other_version["preprocessing"]["node_features"]["version"] = "0"
    with pytest.raises(InputError, match="computes 22 of version 1"):
        load_model(_save_without_integrity(network, other_version, tmp_path / "version.pt"))


def test_export_refuses_a_card_that_does_not_describe_the_fusion(trained, tmp_path):
    run = trained["concat"]
    plain_card = copy.deepcopy(run["card"])
    plain_card["preprocessing"].pop("node_features")
    with pytest.raises(InputError, match="no preprocessing.node_features"):
        export_torchscript(run["result"].model, plain_card, tmp_path / "a.pt")
    mean_card = copy.deepcopy(run["card"])
    mean_card["preprocessing"]["node_features"]["fusion"] = "mean"
    with pytest.raises(InputError, match="as its card says"):
        export_torchscript(run["result"].model, mean_card, tmp_path / "b.pt")
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "b.pt").exists()


# --------------------------------------------------------------------------------------------
# Grad-CAM


@pytest.mark.parametrize("mode", ["mean", "concat"])
def test_gradcam_of_a_fused_model_is_gradcam_of_its_image_branch(cohort, trained, mode, tmp_path):
    run = trained[mode]
    image_card = copy.deepcopy(run["card"])
    image_card["preprocessing"].pop("node_features")
    image_only = load_model(export_torchscript(run["result"].model.image, image_card, tmp_path / "image.pt"))
    fused = load_model(run["path"])
    batch = cohort["patchset"].x[:6]
    classes = np.array([0, 1, 0, 1, 1, 0])
    np.testing.assert_array_equal(gradcam(fused, batch, target=classes), gradcam(image_only, batch, target=classes))


def test_evaluate_scores_a_fused_model_by_its_fused_probability(cohort, trained):
    from LymphNodeClassifierLib.evaluate import evaluate_dataset

    patchset = cohort["patchset"]
    loaded = load_model(trained["mean"]["path"])
    evaluation = evaluate_dataset(loaded, cohort["dataset"], n_boot=0)
    rows = {(r["case_id"], r["label_value"]): r["probability"] for r in evaluation.predictions()}
    fused, image = predict_fused(loaded, patchset.x, patchset.node_features)
    got = np.array([rows[(str(c), int(v))] for c, v in zip(patchset.case_ids, patchset.label_values)])
    np.testing.assert_allclose(got, fused, atol=1e-6)
    assert not np.allclose(got, image)


# --------------------------------------------------------------------------------------------
# the command's input policy and the options fusion does not combine with


def test_features_are_read_under_the_commands_input_policy(tmp_path):
    """A CT accepted only through --not-hu-ok (the command's policy) must not be refused when its features are read."""
    import SimpleITK as sitk

    from LymphNodeClassifierLib.validate import InputPolicy

    dataset = generate_cohort(tmp_path / "cohort", cases=2, seed=5)
    case = next(iter(dataset.cases))
    path = dataset.ct_path(case)
    ct = sitk.ReadImage(str(path))
    shifted = sitk.Cast(ct, sitk.sitkInt32) + 1024  # stored without the rescale intercept: not HU any more
    shifted.CopyInformation(ct)
    sitk.WriteImage(shifted, str(path), True)
    patchset = build_patchset(dataset, small_config("mean").patch_spec(), small_config("mean").window, policy=InputPolicy(not_hu_ok=True))
    rows = np.asarray(patchset.case_ids).astype(str) == case.case_id
    assert rows.any()
    with pytest.raises(InputError, match="Hounsfield"):
        feature_matrix(dataset, np.asarray(patchset.case_ids)[rows], np.asarray(patchset.label_values)[rows])
    features = feature_matrix(dataset, np.asarray(patchset.case_ids)[rows], np.asarray(patchset.label_values)[rows], policy=InputPolicy(not_hu_ok=True))
    assert np.isfinite(features[:, FEATURE_NAMES.index("log_volume_mm3")]).all()
    attached = attach_features(dataset, patchset, small_config("mean"), policy=InputPolicy(not_hu_ok=True))
    assert attached.node_features.shape == (len(patchset), F)


@pytest.mark.parametrize("extra", [["--first-member", "1"], ["--ensemble", "2"], ["--tta", "flips"]])
def test_crossval_refuses_fusion_with_combined_members_before_any_work(cohort, tmp_path, extra):
    """Their fold predictions would come from the image branch alone, reported as fused."""
    with pytest.raises(InputError, match="--fusion mean does not combine") as error:  # before the (missing) dataset is read
        crossval.main(["--dataset", str(tmp_path / "no-such-dataset"), "--out", str(tmp_path / "cv"), "--fusion", "mean", *extra])
    assert "\n" not in str(error.value)
    option = extra[0].lstrip("-").replace("-", "_")
    value = int(extra[1]) if option != "tta" else extra[1]
    with pytest.raises(InputError, match="does not combine"):  # the Python API too, before any fold trains
        crossval.cross_validate(cohort["patchset"], small_config("mean"), folds=2, **{option: value})


def test_a_fused_card_with_test_time_augmentation_is_refused(trained):
    card = copy.deepcopy(trained["mean"]["card"])
    card["preprocessing"]["tta"] = "flips"
    with pytest.raises(InputError, match="not applied by a fused model"):
        validate_card(card)
