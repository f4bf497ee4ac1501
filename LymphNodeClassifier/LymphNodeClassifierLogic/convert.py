"""Volume node <-> SimpleITK image, converting RAS (Slicer) <-> LPS (ITK) on purpose.

Slicer stores a volume's geometry as an IJK->RAS matrix; SimpleITK images carry origin, spacing and
direction in LPS. RAS = diag(-1, -1, 1) * LPS, so the IJK->LPS matrix is that diagonal times
IJK->RAS. Voxel arrays are shared as numpy arrays indexed [k, j, i] on both sides.
(Slicer's own sitkUtils needs the Slicer application's MRMLIDImageIO, absent from slicer-core, so
the conversion is done here from the matrix.)
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0])


def ijk_to_ras_matrix(volume_node) -> np.ndarray:
    """The node's 4x4 IJK->RAS matrix as numpy."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def sitk_image_from_volume_node(volume_node) -> sitk.Image:
    """Copy a scalar/labelmap volume node into a SimpleITK image with LPS geometry.

    A parent transform on the node is not applied: the caller must harden it first (Slicer's
    own modules do the same), so we refuse a transformed node rather than silently misplace it.
    """
    if volume_node is None or volume_node.GetImageData() is None:
        raise ValueError("the volume node has no image data")
    if volume_node.GetParentTransformNode() is not None:
        from LymphNodeClassifierLib.errors import InputError

        raise InputError(
            f"Volume '{volume_node.GetName()}' is under a transform; harden the transform "
            "(Data module, right-click > Harden transform) and try again."
        )
    array = slicer.util.arrayFromVolume(volume_node)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    ijk_to_lps = RAS_FROM_LPS @ ijk_to_ras_matrix(volume_node)[:3, :4]
    axes = ijk_to_lps[:, :3]
    spacing = np.linalg.norm(axes, axis=0)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(d) for d in (axes / spacing).ravel()))
    image.SetOrigin(tuple(float(o) for o in ijk_to_lps[:, 3]))
    return image


def update_volume_node_from_sitk_image(volume_node, image: sitk.Image) -> None:
    """Write a SimpleITK image (LPS) into an existing volume node (RAS), voxels and geometry."""
    array = sitk.GetArrayFromImage(image)
    slicer.util.updateVolumeFromArray(volume_node, array)
    spacing = np.array(image.GetSpacing())
    direction = np.array(image.GetDirection()).reshape(3, 3)
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = RAS_FROM_LPS @ direction * spacing
    ijk_to_ras[:3, 3] = RAS_FROM_LPS @ np.array(image.GetOrigin())
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, ijk_to_ras[r, c])
    volume_node.SetIJKToRASMatrix(matrix)
    volume_node.Modified()


def load_volume_node(scene, path: str, name: str | None = None, labelmap: bool = False):
    """Read a volume file into the scene through Slicer's Volumes module logic (as Slicer's Add Data
    does; a label map gets the Colors logic's default colour table)."""
    from .module_logics import volumes_logic

    node_name = name or path
    node = volumes_logic(scene).AddArchetypeVolume(str(path), node_name, 1 if labelmap else 0)
    if node is None:
        from LymphNodeClassifierLib.errors import InputError

        raise InputError(f"Could not read '{path}' as a volume; check that it is an image file (NRRD, NIfTI, MHA).")
    return node
