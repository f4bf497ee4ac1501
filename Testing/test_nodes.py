"""Nodes from label maps, checked against analytic ellipsoids and SimpleITK's own geometry."""

import math

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeClassifierLib.errors import InputError
from LymphNodeClassifierLib.geometry import lps_to_ras
from LymphNodeClassifierLib.nodes import NodeInfo, extract_nodes
from helpers import TILTED, rotation




def ellipsoid_label(
    semi_axes_mm, centre_lps, size=(60, 50, 40), spacing=(0.7, 0.7, 1.0), origin=None,
    direction=np.eye(3), in_plane_degrees=0.0, value=1,
) -> sitk.Image:
    """A label map with `value` on voxels whose centre is inside an ellipsoid (physical space).

    The ellipsoid's first two axes are rotated by `in_plane_degrees` about the patient z axis.
    Without `origin`, the grid is placed so the centre lies near (not on) the middle voxel.
    Voxel centres come from SimpleITK's TransformIndexToPhysicalPoint (independent of the Lib).
    """
    affine = np.asarray(direction, dtype=float) @ np.diag(spacing)
    if origin is None:
        origin = np.asarray(centre_lps) - affine @ ((np.asarray(size) - 1) / 2 + (0.31, 0.17, 0.41))
    label = sitk.Image(size, sitk.sitkUInt16)
    label.SetSpacing(spacing)
    label.SetOrigin(tuple(float(v) for v in origin))
    label.SetDirection(tuple(np.asarray(direction, dtype=float).ravel()))
    # matrix form of TransformIndexToPhysicalPoint, verified on two voxels below
    k, j, i = np.indices(size[::-1])
    points = np.stack([i, j, k], axis=-1) @ affine.T + np.asarray(label.GetOrigin())
    for index in [(0, 0, 0), (size[0] - 1, 3, size[2] - 2)]:
        np.testing.assert_allclose(points[index[::-1]], label.TransformIndexToPhysicalPoint(index), atol=1e-9)
    local = (points - np.asarray(centre_lps)) @ rotation(2, in_plane_degrees)  # into the ellipsoid's frame
    inside = np.sum((local / np.asarray(semi_axes_mm, dtype=float)) ** 2, axis=-1) <= 1.0
    array = (inside * value).astype(np.uint16)
    result = sitk.GetImageFromArray(array)
    result.CopyInformation(label)
    return result


SEMI_AXES = (9.0, 6.0, 5.0)
CENTRE = (1.3, -0.8, 2.45)
VOXEL_MM = 0.7


def check_ellipsoid_node(node: NodeInfo, axis_tolerance_mm: float) -> None:
    a, b, c = SEMI_AXES
    assert node.long_axis_mm == pytest.approx(2 * a, abs=axis_tolerance_mm)
    assert node.short_axis_mm == pytest.approx(2 * b, abs=axis_tolerance_mm)
    assert node.volume_mm3 == pytest.approx(4 / 3 * math.pi * a * b * c, rel=0.05)
    np.testing.assert_allclose(node.centroid_lps, CENTRE, atol=0.2)
    np.testing.assert_allclose(node.centroid_ras, lps_to_ras(np.array(CENTRE)), atol=0.2)
    assert abs(node.axes_plane_z_lps - CENTRE[2]) < 1.5  # the widest slices are near the equator
    ends = np.array(node.long_axis_endpoints_lps)
    assert np.linalg.norm(ends[0] - ends[1]) == pytest.approx(node.long_axis_mm)
    short_ends = np.array(node.short_axis_endpoints_lps)
    assert np.linalg.norm(short_ends[0] - short_ends[1]) == pytest.approx(node.short_axis_mm)
    # perpendicular axes on the same axial plane
    assert ends[0, 2] == short_ends[0, 2] == node.axes_plane_z_lps
    assert abs(np.dot(ends[1] - ends[0], short_ends[1] - short_ends[0])) < 1e-6


@pytest.mark.parametrize("in_plane_degrees", [0.0, 30.0])
def test_ellipsoid_axes_volume_and_centroid(in_plane_degrees):
    label = ellipsoid_label(SEMI_AXES, CENTRE, in_plane_degrees=in_plane_degrees)
    nodes, components = extract_nodes(label)
    assert len(nodes) == 1
    node = nodes[0]
    check_ellipsoid_node(node, axis_tolerance_mm=VOXEL_MM)
    assert node.voxel_count == int(sitk.GetArrayViewFromImage(label).astype(bool).sum())
    assert node.volume_mm3 == pytest.approx(node.voxel_count * 0.7 * 0.7 * 1.0)
    assert not node.touches_edge
    # long-axis direction follows the in-plane rotation (axis is unsigned)
    ends = np.array(node.long_axis_endpoints_lps)
    angle = math.degrees(math.atan2(*(ends[1, :2] - ends[0, :2])[::-1])) % 180
    assert min(abs(angle - in_plane_degrees), 180 - abs(angle - in_plane_degrees)) < 15


@pytest.mark.parametrize("in_plane_degrees", [0.0, 30.0])
def test_ellipsoid_in_tilted_ct_measures_the_same(in_plane_degrees):
    # voxel slices are not patient-axial here: the axes must still be measured on patient-axial planes
    label = ellipsoid_label(SEMI_AXES, CENTRE, direction=TILTED, in_plane_degrees=in_plane_degrees)
    nodes, _ = extract_nodes(label)
    assert len(nodes) == 1 and not nodes[0].touches_edge
    check_ellipsoid_node(nodes[0], axis_tolerance_mm=1.5 * VOXEL_MM)


def test_ellipsoid_tilted_so_that_voxel_slices_are_oblique():
    # a flat ellipsoid in a CT tilted 40 degrees about x: the voxel slices cut it obliquely, so
    # measuring them as they are would give a short axis far from 2 * 6 mm
    semi_axes = (9.0, 6.0, 2.5)
    direction = rotation(0, 40)
    label = ellipsoid_label(semi_axes, CENTRE, size=(50, 50, 50), spacing=(0.7, 0.7, 0.7), direction=direction)
    node = extract_nodes(label)[0][0]
    assert not node.touches_edge
    assert node.long_axis_mm == pytest.approx(18.0, abs=1.5 * VOXEL_MM)
    assert node.short_axis_mm == pytest.approx(12.0, abs=1.5 * VOXEL_MM)
    np.testing.assert_allclose(node.centroid_lps, CENTRE, atol=0.2)


def test_component_image_holds_node_ids_on_the_label_grid():
    label = ellipsoid_label((4.0, 4.0, 3.0), (-8.0, 0.0, 0.0), origin=(-20.0, -15.0, -10.0))
    label = label + ellipsoid_label((3.0, 3.0, 3.0), (8.0, 2.0, 4.0), origin=(-20.0, -15.0, -10.0), value=5)
    nodes, components = extract_nodes(label)
    assert components.GetPixelID() in (sitk.sitkUInt16, sitk.sitkUInt32)
    assert components.GetSize() == label.GetSize() and components.GetOrigin() == label.GetOrigin()
    label_array, component_array = sitk.GetArrayFromImage(label), sitk.GetArrayFromImage(components)
    assert [n.node_id for n in nodes] == [1, 2]
    for node in nodes:
        own = component_array == node.node_id
        assert own.sum() == node.voxel_count
        assert set(np.unique(label_array[own])) == {node.label_value}
        i0, j0, k0, i1, j1, k1 = node.bbox_index
        k, j, i = np.nonzero(own)
        assert (i.min(), j.min(), k.min(), i.max(), j.max(), k.max()) == (i0, j0, k0, i1, j1, k1)
    np.testing.assert_array_equal(component_array > 0, label_array > 0)


def test_node_order_is_memory_order_of_first_voxel():
    array = np.zeros((10, 10, 10), dtype=np.uint8)
    array[8, 8, 8] = 1  # label 1, but its first voxel comes last in memory
    array[2, 5, 5] = 9
    array[5, 1, 1] = 3
    nodes, _ = extract_nodes(sitk.GetImageFromArray(array))
    assert [(n.node_id, n.label_value) for n in nodes] == [(1, 9), (2, 3), (3, 1)]


def test_corner_touching_voxels_are_one_node_26_connectivity():
    array = np.zeros((6, 6, 6), dtype=np.uint8)
    array[2, 2, 2] = 1
    array[3, 3, 3] = 1  # shares only a corner with the first voxel
    array[5, 5, 0] = 1  # separate
    nodes, _ = extract_nodes(sitk.GetImageFromArray(array))
    assert [n.voxel_count for n in nodes] == [2, 1]


def test_component_mode_vs_per_label_value_mode():
    array = np.zeros((12, 12, 12), dtype=np.uint8)
    array[2:5, 2:5, 2:5] = 4  # one component holding two values: 4 (27 voxels) ...
    array[2:5, 2:5, 5] = 6  # ... and 6 (9 voxels) touching it
    array[8:10, 8:10, 8:10] = 4  # a second, separate component of value 4
    label = sitk.GetImageFromArray(array)

    by_component, _ = extract_nodes(label)
    assert [(n.label_value, n.voxel_count) for n in by_component] == [(4, 36), (4, 8)]
    assert by_component[0].label_values_in_component == (4, 6)

    by_value, components = extract_nodes(label, per_label_value=True)
    assert [(n.node_id, n.label_value, n.voxel_count) for n in by_value] == [(1, 4, 35), (2, 6, 9)]
    component_array = sitk.GetArrayFromImage(components)
    np.testing.assert_array_equal(component_array == 1, array == 4)
    np.testing.assert_array_equal(component_array == 2, array == 6)


def test_edge_node_is_kept_and_flagged():
    array = np.zeros((8, 9, 10), dtype=np.uint8)
    array[3:5, 3:5, 0:3] = 2  # touches i = 0
    array[7, 4:6, 4:6] = 3  # touches the last k
    array[3:5, 3:5, 5:7] = 1  # inside
    nodes, _ = extract_nodes(sitk.GetImageFromArray(array))
    flags = {n.label_value: n.touches_edge for n in nodes}
    assert flags == {1: False, 2: True, 3: True}


def test_empty_label_gives_no_nodes():
    nodes, components = extract_nodes(sitk.Image((5, 5, 5), sitk.sitkUInt8))
    assert nodes == []
    assert sitk.GetArrayViewFromImage(components).max() == 0


def test_float_label_is_refused():
    with pytest.raises(InputError):
        extract_nodes(sitk.Image((5, 5, 5), sitk.sitkFloat32))
