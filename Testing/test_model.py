"""Model architectures, model card, TorchScript export / load, device selection and inference."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from LymphNodeClassifierLib import inference, model
from LymphNodeClassifierLib.errors import InputError

ARCHS = ["custom_cnn", "small_resnet"]
SIZE = 32  # small patches keep the suite fast; 64 is exercised in test_default_size_shapes


def make_card(arch: str = "custom_cnn", views: str = "triplanar", mask: bool = False, size: int = SIZE) -> dict:
    return model.new_card(
        architecture=arch,
        preprocessing={
            "window_low": -160.0, "window_high": 240.0, "window_preset": "abdomen",
            "spacing_mm": [0.79, 0.79, 0.79], "patch_size": size, "field_of_view_mm": 0.79 * size,
            "views": views, "mask_channel": mask, "air_hu": -1000.0,
        },
        training={
            "command": "python -m LymphNodeClassifierLib train --dataset d", "seed": 7, "epochs": 3,
            "dataset": {"cases": 4, "nodes": 20, "class_balance": {"metastatic": 8, "benign": 12}, "fingerprint": "abc123"},
        },
        metrics={"validation": {"auc": 0.9}, "test": {"auc": 0.85}, "held_out": {}},
        decision_threshold=0.4,
        model_version="0.1.0",
        name="test model",
        description="unit test",
        created="2024-05-01",
    )


def _jit_save(module: torch.jit.ScriptModule, path: Path, extra: dict | None = None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(module, str(path), _extra_files=extra or {})


def _script(module: nn.Module) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(module)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One exported model file per architecture: {arch: (eager eval model, card, path)}."""
    out = {}
    folder = tmp_path_factory.mktemp("models")
    for i, arch in enumerate(ARCHS):
        torch.manual_seed(i)
        eager = model.build_model(arch, 3, SIZE)
        # Give BatchNorm non-trivial running statistics so eval mode differs from train mode.
        with torch.no_grad():
            for _ in range(3):
                eager(torch.rand(8, 3, SIZE, SIZE))
        eager.eval()
        card = make_card(arch)
        path = model.export_torchscript(eager, card, folder / f"{arch}.pt")
        out[arch] = (eager, card, path)
    return out


# ---------------------------------------------------------------------------- architectures


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("channels", [1, 3, 4])
def test_default_size_shapes(arch, channels):
    net = model.build_model(arch, channels, 64).eval()
    x = torch.rand(2, channels, 64, 64)
    with torch.no_grad():
        fmap = net.features(x)
        logits = net(x)
    assert fmap.ndim == 4 and fmap.shape[0] == 2 and fmap.shape[-1] == 16
    assert logits.shape == (2,)
    assert torch.equal(net.head(fmap), logits)


def test_build_model_rejects_unknown_architecture_and_bad_shape():
    with pytest.raises(InputError, match="Unknown architecture"):
        model.build_model("vgg19", 3, 64)
    with pytest.raises(InputError, match="patch size"):
        model.build_model("custom_cnn", 3, 4)
    with pytest.raises(InputError, match="channels"):
        model.build_model("small_resnet", 0, 64)
    assert isinstance(model.build_model("SmallResNet", 1, 64), model.SmallResNet)


# ---------------------------------------------------------------------------- export / load


@pytest.mark.parametrize("arch", ARCHS)
def test_torchscript_round_trip_matches_eager(exported, arch):
    eager, card, path = exported[arch]
    loaded = model.load_model(path, "cpu")
    assert isinstance(loaded.module, torch.jit.ScriptModule)
    x = torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = eager(x)
        got = loaded.module(x)
        got_features = loaded.module.features(x)
        got_head = loaded.module.head(got_features)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_features, eager.features(x).detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(got_head, want, atol=1e-5, rtol=0)
    assert not loaded.module.training


@pytest.mark.parametrize("arch", ARCHS)
def test_card_read_back_equal(exported, arch):
    eager, card, path = exported[arch]
    expected = copy.deepcopy(card)
    expected["architecture"]["parameters"] = model.count_parameters(eager)
    loaded = model.load_model(path, "cpu")
    integrity = loaded.card.pop("integrity")
    # The digest is recomputed from the eager model's own tensors, not from the file.
    assert integrity["weights_sha256"] == model.weights_digest(eager)
    assert integrity["input_shape"] == [3, SIZE, SIZE]
    expected["integrity"] = integrity
    assert loaded.card | {"integrity": integrity} == expected
    assert model.read_card(path) == expected
    assert loaded.in_channels == 3 and loaded.patch_size == SIZE and loaded.decision_threshold == 0.4


def test_export_refuses_card_that_does_not_match_model(tmp_path):
    net = model.build_model("custom_cnn", 1, SIZE)
    with pytest.raises(InputError, match="does not match its card"):
        model.export_torchscript(net, make_card("custom_cnn"), tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left behind


def test_failed_export_leaves_existing_file_untouched(tmp_path, exported):
    _, _, path = exported["custom_cnn"]
    target = tmp_path / "m.pt"
    target.write_bytes(path.read_bytes())
    before = target.read_bytes()
    bad = make_card("custom_cnn")
    bad["decision_threshold"] = 2.0
    with pytest.raises(InputError, match="decision_threshold"):
        model.export_torchscript(model.build_model("custom_cnn", 3, SIZE), bad, target)
    assert target.read_bytes() == before


class _Unscriptable(model.CustomCNN):
    """Its features method uses Python that TorchScript cannot compile, forcing the trace fallback."""

    @torch.jit.export
    def features(self, x: torch.Tensor) -> torch.Tensor:
        scale = {"a": 1.0}.get(*["a"])  # star-args: not supported by TorchScript
        return self.body(x) * scale


def test_export_falls_back_to_trace_and_says_why(tmp_path):
    net = _Unscriptable(3, SIZE).eval()
    with pytest.warns(RuntimeWarning, match="torch.jit.script failed"):
        path = model.export_torchscript(net, make_card("custom_cnn"), tmp_path / "traced.pt")
    loaded = model.load_model(path)
    x = torch.rand(3, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), net(x), atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded.module.head(loaded.module.features(x)), net(x), atol=1e-5, rtol=0)


def test_file_without_card_is_refused(tmp_path):
    path = tmp_path / "nocard.pt"
    _jit_save(_script(model.build_model("custom_cnn", 3, SIZE).eval()), path)
    for reader in (model.load_model, model.read_card):
        with pytest.raises(InputError, match="no model card") as info:
            reader(path)
        assert str(path) in str(info.value)


def _save_with_card(tmp_path: Path, card_text: str, name: str = "m.pt") -> Path:
    path = tmp_path / name
    _jit_save(_script(model.build_model("custom_cnn", 3, SIZE).eval()), path, {"model_card.json": card_text})
    return path


def test_unknown_card_version_is_refused(tmp_path):
    card = make_card()
    card["card_version"] = 2
    path = _save_with_card(tmp_path, json.dumps(card))
    for reader in (model.load_model, model.read_card):
        with pytest.raises(InputError, match=r"newer/unknown LymphNodeClassifier \(card version 2\); update the extension or re-export") as info:
            reader(path)
        assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.pop("preprocessing"), "preprocessing is missing"),
        (lambda c: c["preprocessing"].update(window_high=-500.0), "window_high"),
        (lambda c: c["preprocessing"].update(channels=["axial", "coronal"]), "channels"),
        (lambda c: c["architecture"].update(in_channels=4), "in_channels"),
        (lambda c: c["architecture"].update(name="vgg"), "architecture.name"),
        (lambda c: c.update(created="yesterday"), "ISO date"),
        (lambda c: c.pop("card_version"), "no card_version"),
    ],
)
def test_invalid_card_is_refused(tmp_path, mutate, message):
    card = make_card()
    mutate(card)
    with pytest.raises(InputError, match=message):
        model.validate_card(card)
    path = _save_with_card(tmp_path, json.dumps(card))
    with pytest.raises(InputError, match=message):
        model.load_model(path)


def test_card_that_is_not_json_is_refused(tmp_path):
    path = _save_with_card(tmp_path, "{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        model.load_model(path)


def test_non_torchscript_files_are_refused(tmp_path):
    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    state_dict = tmp_path / "state_dict.pt"
    torch.save(model.build_model("custom_cnn", 3, SIZE).state_dict(), state_dict)
    pickled_module = tmp_path / "module.pt"
    torch.save(model.build_model("custom_cnn", 3, SIZE), pickled_module)
    for path in (random_bytes, state_dict, pickled_module):
        for reader in (model.load_model, model.read_card):
            with pytest.raises(InputError, match="is not a LymphNodeClassifier model file") as info:
                reader(path)
            assert str(path) in str(info.value)
    with pytest.raises(InputError, match="does not exist"):
        model.load_model(tmp_path / "missing.pt")


def test_resolve_device():
    assert model.resolve_device("cpu") == torch.device("cpu")
    assert model.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="Unknown device"):
        model.resolve_device("tpu")
    if torch.cuda.is_available():
        assert model.resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(InputError, match="no usable CUDA"):
            model.resolve_device("cuda")


def test_load_on_cuda_without_cuda_is_refused(exported):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(InputError, match="no usable CUDA"):
        model.load_model(exported["custom_cnn"][2], "cuda")


# ---------------------------------------------------------------------------- inference


def _patches(n: int, channels: int = 3, size: int = SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, channels, size, size), dtype=np.float32)


@pytest.mark.parametrize("arch", ARCHS)
def test_predict_matches_eager_and_is_batch_size_independent(exported, arch):
    eager, _, path = exported[arch]
    loaded = model.load_model(path)
    x = _patches(37)
    with torch.no_grad():
        want = torch.sigmoid(eager(torch.from_numpy(x))).numpy()
    results = [inference.predict(loaded, x, batch_size=b) for b in (1, 5, 16, 64)]
    for probabilities in results:
        assert probabilities.shape == (37,)
        assert np.all((probabilities >= 0) & (probabilities <= 1))
        np.testing.assert_allclose(probabilities, want, atol=1e-6)
        np.testing.assert_allclose(probabilities, results[0], atol=1e-6)


def test_predict_is_deterministic_on_cpu(exported):
    loaded = model.load_model(exported["small_resnet"][2], "cpu")
    x = _patches(20, seed=5)
    first = inference.predict(loaded, x, batch_size=8)
    for _ in range(3):
        assert np.array_equal(inference.predict(loaded, x, batch_size=8), first)
    assert torch.are_deterministic_algorithms_enabled() is False  # global state restored


def test_predict_checks_patch_shape_and_values(exported):
    loaded = model.load_model(exported["custom_cnn"][2])
    with pytest.raises(InputError, match=r"expects \(3, 32, 32\)"):
        inference.predict(loaded, _patches(2, channels=1))
    with pytest.raises(InputError, match=r"expects \(3, 32, 32\)"):
        inference.predict(loaded, _patches(2, size=64))
    with pytest.raises(InputError, match="shape"):
        inference.predict(loaded, _patches(2)[0])
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        inference.predict(loaded, _patches(2) * 400.0)
    with pytest.raises(InputError, match="NaN"):
        bad = _patches(2)
        bad[0, 0, 0, 0] = np.nan
        inference.predict(loaded, bad)
    with pytest.raises(InputError, match="batch size"):
        inference.predict(loaded, _patches(2), batch_size=0)
    assert inference.predict(loaded, _patches(0)).shape == (0,)
    # float64 input is accepted and gives the same answer as float32
    x = _patches(3)
    np.testing.assert_array_equal(inference.predict(loaded, x.astype(np.float64)), inference.predict(loaded, x))


# ---------------------------------------------------------------------------- card integrity


def _resave_with_card(source: Path, target: Path, edit) -> None:
    """What a user editing model_card.json does: same TorchScript weights, the card changed."""
    extra = {model.CARD_FILE_NAME: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(source), _extra_files=extra)
    card = json.loads(extra[model.CARD_FILE_NAME])
    edit(card)
    _jit_save(module, target, {model.CARD_FILE_NAME: json.dumps(card)})


def _set_patch(size):
    def edit(card):
        card["preprocessing"]["patch_size"] = size
        card["preprocessing"]["field_of_view_mm"] = size * card["preprocessing"]["spacing_mm"][0]
    return edit


def _set_spacing(card):
    card["preprocessing"]["spacing_mm"] = [3.0, 3.0, 3.0]


def _set_channels(views, mask):
    def edit(card):
        card["preprocessing"].update(views=views, mask_channel=mask, channels=model.expected_channels(views, mask))
        card["architecture"]["in_channels"] = len(card["preprocessing"]["channels"])
    return edit


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("edit, words", [
    (_set_patch(24), "describes 3 x 24 x 24 patches, the network was exported for 3 x 32 x 32"),
    (_set_patch(16), "describes 3 x 16 x 16 patches"),
    (_set_spacing, "was changed after export (its preprocessing"),
    (_set_channels("axial", False), "describes 1 x 32 x 32 patches"),
    (_set_channels("triplanar", True), "describes 4 x 32 x 32 patches"),
])
def test_card_changed_after_export_is_refused_in_one_line(tmp_path, exported, arch, edit, words):
    _, _, path = exported[arch]
    edited = tmp_path / "edited.pt"
    _resave_with_card(path, edited, edit)
    for reader in (model.load_model, model.read_card):
        with pytest.raises(InputError) as error:
            reader(edited)
        assert words in str(error.value) and "\n" not in str(error.value) and str(edited) in str(error.value)


@pytest.mark.parametrize("edit, words", [
    (_set_channels("axial", False), "does not fit its network: it runs on 1 x 32 x 32 patches"),
    (_set_channels("triplanar", True), "does not fit its network: it runs on 4 x 32 x 32 patches"),
    (_set_patch(16), "does not fit its network: it runs on 3 x 16 x 16 patches"),
])
def test_card_without_digest_that_does_not_fit_the_network_is_refused_by_the_zero_batch(tmp_path, exported, edit, words):
    """An older card (no integrity entry) edited to shapes the custom CNN cannot take: one line, no TorchScript traceback."""
    _, _, path = exported["custom_cnn"]
    edited = tmp_path / "old.pt"
    _resave_with_card(path, edited, lambda card: (card.pop("integrity"), edit(card)))
    model.read_card(edited)  # the card alone is consistent
    with pytest.raises(InputError) as error:
        model.load_model(edited)
    assert words in str(error.value) and "\n" not in str(error.value) and "Traceback" not in str(error.value)


def test_card_without_digest_that_fits_still_loads_and_descriptive_fields_stay_editable(tmp_path, exported):
    _, _, path = exported["small_resnet"]
    legacy = tmp_path / "legacy.pt"
    _resave_with_card(path, legacy, lambda card: card.pop("integrity"))
    assert "integrity" not in model.load_model(legacy).card
    renamed = tmp_path / "renamed.pt"
    _resave_with_card(path, renamed, lambda card: card.update(name="my name", description="edited"))
    assert model.load_model(renamed).card["name"] == "my name"


def test_weights_changed_after_export_are_refused(tmp_path, exported):
    _, _, path = exported["custom_cnn"]
    extra = {model.CARD_FILE_NAME: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), _extra_files=extra)
    with torch.no_grad():
        next(iter(module.parameters())).add_(0.01)
    tampered = tmp_path / "tampered.pt"
    _jit_save(module, tampered, extra)
    with pytest.raises(InputError, match="weights of .* are not the ones its model card was exported with"):
        model.load_model(tampered)


def test_edited_card_is_refused_by_classify_with_one_line_and_nothing_written(tmp_path, exported, capsys):
    from LymphNodeClassifierLib.cli import main as cli_main

    edited = tmp_path / "edited.pt"
    _resave_with_card(exported["small_resnet"][2], edited, _set_patch(24))
    sample = Path(__file__).resolve().parents[1] / "LymphNodeClassifier" / "Resources" / "SampleData" / "images"
    out = tmp_path / "out"
    code = cli_main(["classify", "--ct", str(sample / "P0001-S1_ct.nrrd"), "--labels", str(sample / "P0001-S1_labels.nrrd"),
                     "--out", str(out), "--model", str(edited)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "changed after export" in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_reexport_keeps_weights_card_and_predictions(tmp_path, exported):
    import importlib.util

    spec = importlib.util.spec_from_file_location("reexport", Path(__file__).resolve().parents[1] / "Utilities" / "reexport_bundled_models.py")
    reexport = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reexport)
    _, _, path = exported["small_resnet"]
    legacy = tmp_path / "legacy.pt"
    _resave_with_card(path, legacy, lambda card: card.pop("integrity"))  # as the bundled models were
    before = model.load_model(legacy)
    x = torch.from_numpy(_patches(9, seed=11))
    with torch.no_grad():
        want = before.module(x)
    experience = {"nodes": 5, "source": "test", "short_axis_mm": [3.0, 9.0]}
    card = reexport.reexport(legacy, tmp_path / "new.pt", experience)
    after = model.load_model(tmp_path / "new.pt")
    with torch.no_grad():
        assert torch.equal(after.module(x), want)
    assert card["integrity"]["weights_sha256"] == model.weights_digest(before.module) and card["experience"] == experience
    assert {k: v for k, v in after.card.items() if k not in ("integrity", "experience")} == before.card


@pytest.mark.parametrize("name", ["lymph_node_phantom.pt", "lung_nodule_lidc.pt"])
def test_bundled_models_carry_a_digest_and_their_training_experience(name):
    from LymphNodeClassifierLib.validate import PATCH_HISTOGRAM_BINS

    loaded = model.load_model(Path(__file__).resolve().parents[1] / "LymphNodeClassifier" / "Resources" / "Models" / name)
    integrity, experience = loaded.card["integrity"], loaded.card["experience"]
    assert integrity["weights_sha256"] == model.weights_digest(loaded.module)
    assert integrity["input_shape"] == [loaded.in_channels, loaded.patch_size, loaded.patch_size]
    assert experience["nodes"] == loaded.card["training"]["dataset"]["nodes"]  # the whole training set was regenerated
    histogram = experience["patch_histogram"]
    assert histogram["bins"] == PATCH_HISTOGRAM_BINS and sum(histogram["mean"]) == pytest.approx(1.0, abs=1e-3)
    assert 0 < histogram["distance_p99"] <= histogram["distance_max"] < 1
    low, high = experience["short_axis_mm"]
    assert 0 < low < high
