"""Grad-CAM on the TorchScript model (checked against captum) and the CAM mapped back into CT space."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from captum.attr import LayerAttribution, LayerGradCam

from LymphNodeClassifierLib import gradcam as G
from LymphNodeClassifierLib import inference, model
from LymphNodeClassifierLib.errors import InputError

ARCHS = ["custom_cnn", "small_resnet"]
SIZE = 32


def make_card(arch: str, channels: int, size: int = SIZE) -> dict:
    views, mask = {1: ("axial", False), 3: ("triplanar", False), 4: ("triplanar", True)}[channels]
    return model.new_card(
        architecture=arch,
        preprocessing={
            "window_low": -160.0, "window_high": 240.0, "window_preset": "abdomen",
            "spacing_mm": [0.79] * 3, "patch_size": size, "field_of_view_mm": 0.79 * size,
            "views": views, "mask_channel": mask, "air_hu": -1000.0,
        },
        training={"command": "pytest", "seed": 0, "epochs": 1, "dataset": {}},
        created="2024-05-01",
    )


def blob_patches(n: int, rng: np.random.Generator, channels: int = 1, size: int = SIZE, radius: float = 4.0):
    """Noise patches; label 1 ones hold a bright disc at a random position (the only class cue)."""
    x = rng.normal(0.35, 0.08, (n, channels, size, size)).astype(np.float32)
    y = rng.integers(0, 2, n)
    centres = rng.uniform(radius + 1, size - radius - 2, (n, 2))
    rr, cc = np.mgrid[0:size, 0:size]
    for i in np.flatnonzero(y):
        disc = np.hypot(rr - centres[i, 0], cc - centres[i, 1]) <= radius
        x[i, :, disc] = rng.uniform(0.75, 0.95)
    return np.clip(x, 0.0, 1.0), y.astype(np.float32), centres


def hilum_patches(n: int, rng: np.random.Generator, channels: int = 1, size: int = SIZE, radius: float = 4.0):
    """Every patch holds a node (a bright disc) at a random position; a benign node (label 0) has
    a fatty hilum (a dark centre), a metastatic one (label 1) is filled in: each class has a cue
    on the node."""
    x = rng.normal(0.35, 0.08, (n, channels, size, size)).astype(np.float32)
    y = rng.integers(0, 2, n)
    centres = rng.uniform(radius + 1, size - radius - 2, (n, 2))
    rr, cc = np.mgrid[0:size, 0:size]
    for i in range(n):
        distance = np.hypot(rr - centres[i, 0], cc - centres[i, 1])
        x[i, :, distance <= radius] = rng.uniform(0.75, 0.9)
        if not y[i]:
            x[i, :, distance <= 2.0] = rng.uniform(0.05, 0.15)
    return np.clip(x, 0.0, 1.0), y.astype(np.float32), centres


def train(net: torch.nn.Module, steps: int, rng: np.random.Generator, channels: int, make_patches=blob_patches) -> torch.nn.Module:
    optimiser = torch.optim.Adam(net.parameters(), lr=2e-3)
    net.train()
    for _ in range(steps):
        x, y, _ = make_patches(32, rng, channels)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(torch.from_numpy(x)), torch.from_numpy(y))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return net.eval()


def export_and_load(net, arch, channels, tmp_path):
    path = model.export_torchscript(net, make_card(arch, channels), tmp_path / f"{arch}.pt")
    return model.load_model(path, "cpu")


# ---------------------------------------------------------------------------- Grad-CAM


class ClassScore(torch.nn.Module):
    """The score of one class as a (N, 1) output for captum's ``target=0``: the logit for
    "metastatic", minus the logit for "benign" (the model has one output)."""

    def __init__(self, net: torch.nn.Module, sign: float):
        super().__init__()
        self.net, self.sign = net, sign

    def forward(self, x):
        return (self.sign * self.net(x))[:, None]


def captum_gradcam(net: torch.nn.Module, x: np.ndarray, target_class: str = "metastatic") -> np.ndarray:
    """Reference: captum's LayerGradCam on the eager model at the layer that features() ends with."""
    scorer = ClassScore(net, 1.0 if target_class == "metastatic" else -1.0)
    layer_cam = LayerGradCam(scorer, net.feature_layer())
    attribution = layer_cam.attribute(torch.from_numpy(x), target=0, relu_attributions=True)
    upsampled = LayerAttribution.interpolate(attribution, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    return upsampled[:, 0].detach().numpy()


@pytest.mark.parametrize("target_class", ["metastatic", "benign"])
@pytest.mark.parametrize("trained", [False, True], ids=["random_init", "trained"])
@pytest.mark.parametrize("arch", ARCHS)
def test_gradcam_matches_captum(arch, trained, target_class, tmp_path):
    torch.manual_seed(11)
    rng = np.random.default_rng(11)
    net = model.build_model(arch, 3, SIZE)
    if trained:  # on nodes with a cue for each class, so both classes have evidence to show
        train(net, 15, rng, channels=3, make_patches=hilum_patches)
    else:
        with torch.no_grad():  # non-trivial BatchNorm statistics
            net(torch.from_numpy(hilum_patches(16, rng, 3)[0]))
    net.eval()
    loaded = export_and_load(net, arch, 3, tmp_path)
    x, _, _ = hilum_patches(24, np.random.default_rng(99), 3)

    ours, classes = G.gradcam(loaded, x, target=target_class, return_classes=True)
    reference = captum_gradcam(net, x, target_class)

    assert ours.shape == (24, SIZE, SIZE) and ours.dtype == np.float32
    assert ours.min() >= 0.0 and ours.max() <= 1.0
    assert np.array_equal(classes, np.full(24, 1 if target_class == "metastatic" else 0))
    compared = 0
    for mine, ref in zip(ours, reference):
        if ref.max() <= 1e-7 * max(1e-30, np.abs(reference).max()):
            assert mine.max() == 0.0 or np.allclose(mine, 0.0, atol=1e-3)
            continue
        assert mine.max() == pytest.approx(1.0)
        r = np.corrcoef(mine.ravel(), ref.ravel())[0, 1]
        assert r >= 0.99, f"Pearson {r:.4f} between Grad-CAM and captum"
        compared += 1
    assert compared >= 4  # enough nodes have a non-empty map to compare (all but the briefly trained CNN's benign maps)


def test_predicted_class_map_is_the_metastatic_or_the_benign_map_by_threshold(tmp_path):
    torch.manual_seed(5)
    net = train(model.build_model("small_resnet", 3, SIZE), 10, np.random.default_rng(5), channels=3)
    loaded = export_and_load(net, "small_resnet", 3, tmp_path)
    x, _, _ = blob_patches(16, np.random.default_rng(6), 3)
    metastatic = G.gradcam(loaded, x, target="metastatic")
    benign = G.gradcam(loaded, x, target="benign")
    probabilities = inference.predict(loaded, x)
    for threshold in (0.5, float(np.median(probabilities))):  # the median splits the nodes in two
        predicted, logits, classes = G.gradcam(loaded, x, target="predicted", threshold=threshold, return_logits=True, return_classes=True)
        expected = (1.0 / (1.0 + np.exp(-logits.astype(np.float64))) >= threshold).astype(int)
        assert np.array_equal(classes, expected)
        np.testing.assert_allclose(predicted, np.where(classes[:, None, None] == 1, metastatic, benign), atol=1e-6)
    assert 0 < classes.sum() < len(classes)
    # explicit per-node classes (the pipeline passes its own predictions)
    chosen = np.arange(16) % 2
    np.testing.assert_allclose(G.gradcam(loaded, x, target=chosen), np.where(chosen[:, None, None] == 1, metastatic, benign), atol=1e-6)
    # the benign map is not the metastatic one inverted: the ReLU comes after the sign
    both = [(m, b) for m, b in zip(metastatic, benign) if m.max() > 0 and b.max() > 0]
    assert both and all(not np.allclose(b, 1.0 - m, atol=0.05) for m, b in both)


def test_gradcam_target_is_checked(tmp_path):
    loaded = export_and_load(model.build_model("custom_cnn", 1, SIZE).eval(), "custom_cnn", 1, tmp_path)
    x = blob_patches(2, np.random.default_rng(0))[0]
    with pytest.raises(InputError, match="Unknown Grad-CAM class 'malignant'"):
        G.gradcam(loaded, x, target="malignant")
    with pytest.raises(InputError, match="one class per node"):
        G.gradcam(loaded, x, target=[1, 0, 1])
    with pytest.raises(InputError, match="one class per node"):
        G.gradcam(loaded, x, target=[1, 2])


def test_gradcam_on_eager_module_equals_scripted_and_is_batch_independent(tmp_path):
    torch.manual_seed(2)
    net = model.build_model("small_resnet", 3, SIZE)
    net.eval()
    loaded = export_and_load(net, "small_resnet", 3, tmp_path)
    x, _, _ = blob_patches(10, np.random.default_rng(4), 3)
    scripted, logits = G.gradcam(loaded, x, batch_size=4, return_logits=True)
    np.testing.assert_allclose(G.gradcam(loaded, x, batch_size=1), scripted, atol=1e-4)
    net.train()
    eager = G.gradcam(net, x)
    assert net.training  # the caller's mode is restored
    np.testing.assert_allclose(eager, scripted, atol=1e-4)
    np.testing.assert_allclose(logits, inference.predict_logits(loaded, x), atol=1e-5)
    with torch.inference_mode():  # works even when the caller is in inference mode
        np.testing.assert_allclose(G.gradcam(loaded, x), scripted, atol=1e-6)


def test_gradcam_checks_patches_against_the_card(tmp_path):
    loaded = export_and_load(model.build_model("custom_cnn", 3, SIZE).eval(), "custom_cnn", 3, tmp_path)
    with pytest.raises(InputError, match="expects"):
        G.gradcam(loaded, np.zeros((2, 1, SIZE, SIZE), np.float32))


def test_gradcam_zero_evidence_stays_zero(tmp_path):
    net = model.build_model("custom_cnn", 1, SIZE).eval()
    with torch.no_grad():
        net.classifier[-1].weight.zero_()  # logit independent of the features: no evidence anywhere
    loaded = export_and_load(net, "custom_cnn", 1, tmp_path)
    cams = G.gradcam(loaded, blob_patches(3, np.random.default_rng(0))[0])
    assert np.array_equal(cams, np.zeros_like(cams))


@pytest.mark.parametrize("arch", ARCHS)
def test_cam_peak_lies_inside_the_synthetic_node(arch, tmp_path):
    torch.manual_seed(0)
    net = train(model.build_model(arch, 1, SIZE), 90, np.random.default_rng(0), channels=1)
    loaded = export_and_load(net, arch, 1, tmp_path)
    x, y, centres = blob_patches(120, np.random.default_rng(123), 1)
    probabilities = inference.predict(loaded, x)
    assert np.mean((probabilities > 0.5) == (y == 1)) >= 0.9, "the tiny model did not learn the task"
    positive = y == 1
    cams = G.gradcam(loaded, x[positive])
    peaks = np.array([np.unravel_index(np.argmax(cam), cam.shape) for cam in cams])
    distance = np.hypot(peaks[:, 0] - centres[positive, 0], peaks[:, 1] - centres[positive, 1])
    assert np.mean(distance <= 4.0) >= 0.8  # the disc has radius 4 px


@pytest.mark.parametrize("arch", ARCHS)
def test_a_node_called_benign_gets_a_map_peaking_on_the_node(arch, tmp_path):
    torch.manual_seed(0)
    net = train(model.build_model(arch, 1, SIZE), 60, np.random.default_rng(0), channels=1, make_patches=hilum_patches)
    loaded = export_and_load(net, arch, 1, tmp_path)
    x, y, centres = hilum_patches(120, np.random.default_rng(123))
    probabilities = inference.predict(loaded, x)
    assert np.mean((probabilities >= 0.5) == (y == 1)) >= 0.9, "the tiny model did not learn the task"
    cams, classes = G.gradcam(loaded, x, return_classes=True)  # the predicted class by default
    assert np.array_equal(classes, (probabilities >= 0.5).astype(int))
    benign = classes == 0
    assert benign.sum() >= 30
    assert (cams[benign].max(axis=(1, 2)) > 0).all(), "a node called benign got an empty map"
    peaks = np.array([np.unravel_index(np.argmax(cam), cam.shape) for cam in cams[benign]])
    distance = np.hypot(peaks[:, 0] - centres[benign, 0], peaks[:, 1] - centres[benign, 1])
    assert np.mean(distance <= 6.0) >= 0.8  # in or next to the node (radius 4 px)


# ---------------------------------------------------------------------------- CAM → CT space
# A minimal stand-in for patches.NodePatch built from the ARCHITECTURE.md contract (patient-aligned
# planes through the centroid, radiological orientation).

PATCH_STEP = 0.79


@dataclass
class Plane:
    origin_lps: np.ndarray
    row_step_lps: np.ndarray
    col_step_lps: np.ndarray


@dataclass
class Node:
    bbox_index: tuple


@dataclass
class Patch:
    planes: dict
    centre_lps: np.ndarray
    node: Node
    image: np.ndarray


VIEW_AXES = {  # (row step direction, column step direction) in LPS
    "axial": ((0, 1, 0), (1, 0, 0)),      # rows anterior → posterior, columns right → left
    "coronal": ((0, 0, -1), (1, 0, 0)),   # rows superior → inferior, columns right → left
    "sagittal": ((0, 0, -1), (0, 1, 0)),  # rows superior → inferior, columns anterior → posterior
}


def make_patch(ct: sitk.Image, centre_index, views=("axial", "coronal", "sagittal"), size=SIZE, half_extent=(3, 3, 2)) -> Patch:
    centre = np.array(ct.TransformContinuousIndexToPhysicalPoint([float(v) for v in centre_index]))
    planes = {}
    for view in views:
        row, col = (np.array(v, float) * PATCH_STEP for v in VIEW_AXES[view])
        planes[view] = Plane(centre - (size - 1) / 2 * (row + col), row, col)
    c = np.round(centre_index).astype(int)
    bbox = tuple(int(v) for v in (*(c - half_extent), *(c + half_extent)))
    return Patch(planes, centre, Node(bbox), np.zeros((len(views), size, size), np.float32))


def rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.radians(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


# Directions of the test CTs: "identity" and "turned" (i along -y, j along +x: a CT axis still runs
# along every view's normal, so cam_to_volume's broadcast shortcut applies) and "tilted" (it does not).
DIRECTIONS = {"identity": np.eye(3), "turned": np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
              "tilted": rotation((1, 2, 3), 17.0)}


def make_ct(tilted: bool | str) -> sitk.Image:
    ct = sitk.Image([70, 64, 36], sitk.sitkInt16)
    ct.SetSpacing((0.7, 0.9, 2.0))
    ct.SetOrigin((-31.0, 12.5, -80.25))
    name = tilted if isinstance(tilted, str) else ("tilted" if tilted else "identity")
    ct.SetDirection(tuple(DIRECTIONS[name].ravel()))
    return ct


def gaussian_cam(size=SIZE, centre=None, sigma=1.5) -> np.ndarray:
    centre = ((size - 1) / 2, (size - 1) / 2) if centre is None else centre
    rr, cc = np.mgrid[0:size, 0:size]
    return np.exp(-((rr - centre[0]) ** 2 + (cc - centre[1]) ** 2) / (2 * sigma**2)).astype(np.float32)


def volume_points(vol: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """(values (M,), physical points (M, 3)) of every voxel of a SimpleITK image."""
    values = sitk.GetArrayFromImage(vol)
    kk, jj, ii = np.meshgrid(*(np.arange(n) for n in values.shape), indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], 1).astype(float)
    direction = np.array(vol.GetDirection()).reshape(3, 3)
    points = ijk @ (direction @ np.diag(vol.GetSpacing())).T + np.array(vol.GetOrigin())
    return values.ravel(), points


def assert_on_ct_grid(vol: sitk.Image, ct: sitk.Image) -> None:
    assert vol.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(vol.GetSpacing(), ct.GetSpacing(), atol=1e-12)
    np.testing.assert_allclose(vol.GetDirection(), ct.GetDirection(), atol=1e-12)
    index = np.array(ct.TransformPhysicalPointToContinuousIndex(vol.GetOrigin()))
    np.testing.assert_allclose(index, np.round(index), atol=1e-6)
    values = sitk.GetArrayViewFromImage(vol)
    assert values.min() >= 0.0 and values.max() <= 1.0


@pytest.mark.parametrize("tilted", [False, True], ids=["identity", "tilted"])
def test_cam_to_volume_geometry_and_peak_at_centroid(tilted):
    ct = make_ct(tilted)
    centre_index = (31.3, 29.6, 17.2)
    patch = make_patch(ct, centre_index)
    vol = G.cam_to_volume(gaussian_cam()[None], [patch], ct)
    assert_on_ct_grid(vol, ct)
    values, points = volume_points(vol)
    assert values.max() > 0.5
    peak = points[np.argmax(values)]
    peak_index = np.array(ct.TransformPhysicalPointToContinuousIndex(peak))
    assert np.all(np.abs(peak_index - centre_index) <= 1.0 + 1e-9)  # the nearest voxel(s)
    # Zero outside the patch cube (half-diagonal of the 32 * 0.79 mm cube + one voxel).
    distance = np.linalg.norm(points - patch.centre_lps, axis=1)
    assert np.all(values[distance > np.sqrt(3) * SIZE * PATCH_STEP / 2 + 2.0] == 0.0)


def contract_coordinates(points, patch, view):
    """(row, col) of physical points in a view, computed from the contract's axis conventions."""
    d = (points - patch.centre_lps) / PATCH_STEP
    centre = (SIZE - 1) / 2
    row_axis, col_axis = (np.array(v, float) for v in VIEW_AXES[view])
    return centre + d @ row_axis, centre + d @ col_axis


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_cam_to_volume_triplanar_is_geometric_mean_of_views(direction):
    ct = make_ct(direction)
    patch = make_patch(ct, (33.0, 30.4, 18.6))
    rr, cc = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    cam = (0.1 + 0.6 * rr / (SIZE - 1) + 0.3 * cc / (SIZE - 1)).astype(np.float32)  # asymmetric in r, c
    vol = G.cam_to_volume(cam[None], [patch], ct)
    values, points = volume_points(vol)
    expected = np.ones(len(points))
    usable = np.ones(len(points), bool)
    for view in ("axial", "coronal", "sagittal"):
        r, c = contract_coordinates(points, patch, view)
        usable &= (r >= 0) & (r <= SIZE - 1) & (c >= 0) & (c <= SIZE - 1)
        expected *= 0.1 + 0.6 * r / (SIZE - 1) + 0.3 * c / (SIZE - 1)  # bilinear is exact on a linear map
    assert usable.sum() > 1000
    np.testing.assert_allclose(values[usable], np.cbrt(expected[usable]), atol=1e-5)


def test_cam_to_volume_triplanar_off_centre_spot():
    ct = make_ct(True)
    patch = make_patch(ct, (30.0, 31.0, 17.5))
    d = 6.0  # a spot at (centre + d, centre + d) is consistent in all three views at:
    target = patch.centre_lps + d * PATCH_STEP * np.array([1.0, 1.0, -1.0])
    centre = (SIZE - 1) / 2
    vol = G.cam_to_volume(gaussian_cam(centre=(centre + d, centre + d))[None], [patch], ct)
    values, points = volume_points(vol)
    assert np.linalg.norm(points[np.argmax(values)] - target) <= np.linalg.norm(ct.GetSpacing())


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_cam_to_volume_axial_view_is_extruded_over_the_node(direction):
    ct = make_ct(direction)
    centre_index = (35.0, 30.0, 18.0)
    patch = make_patch(ct, centre_index, views=("axial",), half_extent=(3, 3, 2))
    centre = (SIZE - 1) / 2
    spot = (centre + 5, centre - 3)  # rows → posterior (+y), columns → patient left (+x)
    vol = G.cam_to_volume(gaussian_cam(centre=spot)[None], [patch], ct)
    assert_on_ct_grid(vol, ct)
    values, points = volume_points(vol)
    # S-I extent of the node's bounding box (half-voxel margins) in physical z.
    i0, j0, k0, i1, j1, k1 = patch.node.bbox_index
    corners = np.array([ct.TransformContinuousIndexToPhysicalPoint((i, j, k))
                        for i in (i0 - 0.5, i1 + 0.5) for j in (j0 - 0.5, j1 + 0.5) for k in (k0 - 0.5, k1 + 0.5)])
    z = points[:, 2]
    assert np.all(values[(z > corners[:, 2].max() + 1e-6) | (z < corners[:, 2].min() - 1e-6)] == 0.0)
    # Within the node's extent the spot appears at the same (x, y) on every slice.
    target_xy = patch.centre_lps[:2] + PATCH_STEP * np.array([spot[1] - centre, spot[0] - centre])
    near_centre_z = np.abs(z - patch.centre_lps[2]) < 2.0
    hot = near_centre_z & (values > 0.8)
    assert hot.any()
    assert np.all(np.linalg.norm(points[hot, :2] - target_xy, axis=1) < 3.0)


def test_cam_to_volume_two_nodes_max_and_zero_between():
    ct = make_ct(False)
    a = make_patch(ct, (12.0, 14.0, 8.0))
    b = make_patch(ct, (58.0, 50.0, 28.0))
    c = make_patch(ct, (16.0, 16.0, 9.0))  # overlaps a
    cams = np.stack([gaussian_cam(sigma=3.0), gaussian_cam(sigma=3.0), 0.5 * gaussian_cam(sigma=6.0)])
    vol = G.cam_to_volume(cams, [a, b, c], ct)
    assert_on_ct_grid(vol, ct)
    values, points = volume_points(vol)
    reach = np.sqrt(3) * SIZE * PATCH_STEP / 2 + 2.0
    far = np.min([np.linalg.norm(points - p.centre_lps, axis=1) for p in (a, b, c)], axis=0) > reach
    assert far.any() and np.all(values[far] == 0.0)
    # Each node alone, placed into the union grid: the union is their voxel-wise maximum.
    union = sitk.GetArrayFromImage(vol)
    expected = np.zeros_like(union)
    for cam, patch in zip(cams, (a, b, c)):
        alone = G.cam_to_volume(cam[None], [patch], ct)
        offset = np.round(vol.TransformPhysicalPointToContinuousIndex(alone.GetOrigin())).astype(int)
        arr = sitk.GetArrayFromImage(alone)
        sl = tuple(slice(o, o + n) for o, n in zip(offset[::-1], arr.shape))
        expected[sl] = np.maximum(expected[sl], arr)
    np.testing.assert_array_equal(union, expected)


def test_cam_to_volume_inputs():
    ct = make_ct(False)
    patch = make_patch(ct, (30.0, 30.0, 18.0))
    with pytest.raises(InputError, match="2 CAMs for 1 node patches"):
        G.cam_to_volume(np.zeros((2, SIZE, SIZE), np.float32), [patch], ct)
    with pytest.raises(InputError, match="does not match"):
        G.cam_to_volume(np.zeros((1, 16, 16), np.float32), [patch], ct)
    outside = make_patch(ct, (500.0, 500.0, 500.0))
    vol = G.cam_to_volume(gaussian_cam()[None], [outside], ct)  # nothing inside the CT: all zero
    assert_on_ct_grid(vol, ct)
    assert sitk.GetArrayViewFromImage(vol).max() == 0.0


# ---------------------------------------------------------------------------- with the real patches.py


def sphere_case(tilted: bool, radius_mm: float = 5.0):
    """A tilted anisotropic CT with one spherical node and its label map on the same grid."""
    ct = make_ct(tilted)
    centre_index = np.array([33.4, 28.7, 16.6])
    centre = np.array(ct.TransformContinuousIndexToPhysicalPoint(centre_index.tolist()))
    kk, jj, ii = np.meshgrid(*(np.arange(n) for n in ct.GetSize()[::-1]), indexing="ij")
    ijk = np.stack([ii, jj, kk], -1).reshape(-1, 3).astype(float)
    direction = np.array(ct.GetDirection()).reshape(3, 3)
    points = ijk @ (direction @ np.diag(ct.GetSpacing())).T + np.array(ct.GetOrigin())
    inside = (np.linalg.norm(points - centre, axis=1) <= radius_mm).reshape(kk.shape)
    hu = np.where(inside, 60, -100).astype(np.int16)
    ct_image = sitk.GetImageFromArray(hu)
    ct_image.CopyInformation(ct)
    labels = sitk.GetImageFromArray(inside.astype(np.uint8))
    labels.CopyInformation(ct)
    return ct_image, labels


@pytest.mark.parametrize("views", ["triplanar", "axial"])
def test_cam_to_volume_with_real_node_patches(views):
    patches = pytest.importorskip("LymphNodeClassifierLib.patches")
    nodes_module = pytest.importorskip("LymphNodeClassifierLib.nodes")
    ct, labels = sphere_case(tilted=True)
    nodes, components = nodes_module.extract_nodes(labels)
    assert len(nodes) == 1
    spec = patches.PatchSpec(spacing_mm=(0.79, 0.79, 0.79), size=SIZE, views=views)
    [patch] = patches.extract_patches(ct, components, nodes, spec, (-160.0, 240.0))
    vol = G.cam_to_volume(gaussian_cam()[None], [patch], ct)
    assert_on_ct_grid(vol, ct)
    values, points = volume_points(vol)
    centroid = np.array(nodes[0].centroid_lps)
    hot = values >= values.max() - 1e-6
    if views == "triplanar":
        peak_index = np.array(ct.TransformPhysicalPointToContinuousIndex(points[np.argmax(values)]))
        centroid_index = np.array(ct.TransformPhysicalPointToContinuousIndex(centroid))
        assert np.all(np.abs(peak_index - centroid_index) <= 1.0 + 1e-9)
    else:  # a column through the centroid along S-I, within the node's extent
        assert np.all(np.linalg.norm(points[hot, :2] - centroid[:2], axis=1) <= 1.5)
        assert np.all(np.abs(points[values > 0, 2] - centroid[2]) <= 5.0 + 2.0 * max(ct.GetSpacing()))


# ---------------------------------------------------------------------------- every node explained, end to end

REAL_CT = Path(__file__).resolve().parents[2] / "shared" / "data" / "pyradiomics-lung"


def test_pipeline_explains_each_node_s_predicted_class_and_records_it_in_gradcam_nrrd(tmp_path):
    from LymphNodeClassifierLib.classify import DEFAULT_MODEL_PATH
    from LymphNodeClassifierLib.phantoms import generate_case
    from LymphNodeClassifierLib.pipeline import classify_images

    case = generate_case(2)
    loaded = model.load_model(DEFAULT_MODEL_PATH)
    result = classify_images(case.ct, case.labels, loaded)
    assert 0 < result.predictions.sum() < len(result.nodes), "the case should hold nodes of both predicted classes"
    assert np.array_equal(result.cam_classes, result.predictions)
    assert (result.cams.max(axis=(1, 2)) > 0).all(), "every node, benign or metastatic, gets a map"
    path = tmp_path / "gradcam.nrrd"
    sitk.WriteImage(result.cam_volume, str(path), True)
    recorded = G.cam_classes_of(sitk.ReadImage(str(path)))
    assert recorded == {node.node_id: G.CLASS_NAMES[int(p)] for node, p in zip(result.nodes, result.predictions)}
    # asked for one class, every map explains that one
    benign = classify_images(case.ct, case.labels, loaded, gradcam_target="benign")
    assert set(benign.cam_classes) == {0} and set(G.cam_classes_of(benign.cam_volume).values()) == {"benign"}
    predicted_benign = result.predictions == 0
    np.testing.assert_allclose(benign.cams[predicted_benign], result.cams[predicted_benign], atol=1e-6)


@pytest.mark.skipif(not REAL_CT.is_dir(), reason=f"real chest CTs not found at {REAL_CT} (only CI has ../shared beside the clone)")
@pytest.mark.parametrize("model_name", ["lymph_node_phantom.pt", "lung_nodule_lidc.pt"])
@pytest.mark.parametrize("case", [1, 2])
def test_every_lesion_of_the_real_chest_cts_gets_a_map(case, model_name):
    from LymphNodeClassifierLib.classify import DEFAULT_MODEL_PATH
    from LymphNodeClassifierLib.pipeline import classify_images

    loaded = model.load_model(DEFAULT_MODEL_PATH.parent / model_name)
    ct = sitk.ReadImage(str(REAL_CT / f"lung{case}_image.nrrd"))
    labels = sitk.ReadImage(str(REAL_CT / f"lung{case}_label.nrrd"))
    result = classify_images(ct, labels, loaded)
    assert len(result.nodes) >= 1
    assert np.array_equal(result.cam_classes, result.predictions)
    assert np.allclose(result.cams.max(axis=(1, 2)), 1.0), "a lesion got an empty Grad-CAM map"
    assert float(sitk.GetArrayViewFromImage(result.cam_volume).max()) > 0.5


@pytest.mark.parametrize("choice", ["predicted", "benign"])
def test_classify_cli_gradcam_class(choice, tmp_path):
    import csv

    from LymphNodeClassifierLib import classify
    from LymphNodeClassifierLib.phantoms import generate_case, write_case

    case = generate_case(2)
    write_case(case, tmp_path / "ct.nrrd", tmp_path / "labels.nrrd")
    out = tmp_path / "out"
    assert classify.main(["--ct", str(tmp_path / "ct.nrrd"), "--labels", str(tmp_path / "labels.nrrd"), "--out", str(out),
                          "--no-report", "--gradcam-class", choice]) == 0
    with open(out / "nodes.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    predicted = ["metastatic" if int(row["prediction"]) else "benign" for row in rows]
    assert [row["gradcam_class"] for row in rows] == (predicted if choice == "predicted" else ["benign"] * len(rows))
    recorded = G.cam_classes_of(sitk.ReadImage(str(out / "gradcam.nrrd")))
    assert recorded == {int(row["node_id"]): row["gradcam_class"] for row in rows}
    with pytest.raises(InputError, match="gradcam-class"):
        classify.main(["--ct", str(tmp_path / "ct.nrrd"), "--labels", str(tmp_path / "labels.nrrd"), "--out", str(out), "--gradcam-class", "malignant"])
