"""Studies and the scanner: per-study tissue HU (contrast timing), bowel contents, table position,
grid (spacing, slice thickness, gantry tilt), rendering with z partial volume, the PSF blur and
correlated noise, the annotator-like masks and each node's truth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import InputError
from .config import NODE_FIRST, PhantomCase, PhantomConfig, _T
from .shapes import _CosField, _GridTarget, _Node, _NodeShape, _paint, _rot_x, _rot_z, _Table, _texture, _u
from .anatomy import _anatomy_prims, _body_profile, _bowel_prims, _branch_prims, _Patient
from .nodes import _axial_axes

# ------------------------------------------------------------------------------------------------
# studies


@dataclass
class _Study:
    rotation: np.ndarray  # patient frame -> LPS rotation (about S-I)
    translation: np.ndarray  # patient frame origin in LPS
    origin: np.ndarray  # LPS of voxel (0, 0, 0)
    direction: np.ndarray  # columns = image axes in LPS
    spacing: np.ndarray  # (sx, sy, sz)
    size: tuple[int, int, int]  # (ni, nj, nk)
    n_sub: int
    scanner: dict
    lut: np.ndarray
    contents: list
    node_scale: np.ndarray
    jitter_vox: float
    bias_vox: float


def _hu_table(rng: np.random.Generator, cfg: PhantomConfig, patient: _Patient) -> np.ndarray:
    lut = np.zeros(256, dtype=np.float32)
    timing = _u(rng, cfg.contrast_timing)  # 0 late arterial .. 1 portal venous (default range)
    muscle = _u(rng, cfg.muscle_hu)
    visceral = _u(rng, cfg.visceral_fat_hu)
    aorta = cfg.aorta_hu[1] - timing * (cfg.aorta_hu[1] - cfg.aorta_hu[0]) + _u(rng, (-15, 15))
    ivc = cfg.ivc_hu[0] + timing * (cfg.ivc_hu[1] - cfg.ivc_hu[0]) + _u(rng, (-8, 8))
    liver = cfg.liver_hu[0] + timing * (cfg.liver_hu[1] - cfg.liver_hu[0]) + _u(rng, (-6, 6))
    cortex = _u(rng, cfg.kidney_cortex_hu)
    values = {
        _T.AIR: cfg.air_hu,
        _T.TABLE: _u(rng, (80, 200)),
        _T.SKIN: _u(rng, cfg.skin_hu),
        _T.SUBCUTANEOUS_FAT: _u(rng, cfg.subcutaneous_fat_hu),
        _T.MUSCLE: muscle,
        _T.PARASPINAL: muscle + _u(rng, (-6, 4)),
        _T.PSOAS: muscle + _u(rng, (-4, 6)),
        _T.VISCERAL_FAT: visceral,
        _T.BONE_CORTICAL: _u(rng, cfg.cortical_bone_hu),
        _T.BONE_CANCELLOUS: _u(rng, cfg.cancellous_bone_hu),
        _T.DISC: _u(rng, (70, 100)),
        _T.CSF: _u(rng, (5, 20)),
        _T.AORTA: float(np.clip(aorta, *cfg.aorta_hu)),
        _T.IVC: float(np.clip(ivc, *cfg.ivc_hu)),
        _T.ARTERY: float(np.clip(aorta, *cfg.aorta_hu)) - _u(rng, (0, 15)),
        _T.VEIN: float(np.clip(ivc, *cfg.ivc_hu)) + _u(rng, (10, 40)),
        _T.VESSEL_WALL: _u(rng, (35, 55)),
        _T.CALCIFICATION: _u(rng, (500, 1000)),
        _T.LIVER: liver,
        _T.GALLBLADDER: _u(rng, (0, 20)),
        _T.SPLEEN: liver + _u(rng, (0, 15)),
        _T.KIDNEY_CORTEX: cortex,
        _T.KIDNEY_MEDULLA: cortex - (1.0 - timing) * _u(rng, (40, 80)) - _u(rng, (0, 15)),
        _T.RENAL_SINUS_FAT: visceral + _u(rng, (5, 20)),
        _T.URINE: _u(rng, (0, 15)),
        _T.BOWEL_WALL: _u(rng, (40, 80)),
        _T.BOWEL_GAS: _u(rng, (-1000, -980)),
        _T.BOWEL_FLUID: _u(rng, cfg.bowel_fluid_hu),
        _T.ORAL_CONTRAST: _u(rng, (150, 300)),
        _T.FECES: _u(rng, (-60, 30)),
        _T.NODE_NECROSIS: 10.0,
        _T.NODE_HILUM_FAT: visceral + _u(rng, (0, 20)),
    }
    for tissue, value in values.items():
        lut[tissue] = value
    return lut


def _bowel_contents(rng: np.random.Generator, patient: _Patient) -> list:
    contents = []
    for loop in patient.bowel:
        y_mean = float(loop["points"][:, 1].mean())
        level = y_mean + loop["radius"] * _u(rng, (-0.4, 0.4))
        if loop["kind"] == "colon":
            roll = rng.random()
            if roll < 0.6:
                contents.append((_T.FECES, level, bool(rng.random() < 0.6), _CosField(rng, 6, (3.0, 9.0)), _u(rng, (30, 60))))
            elif roll < 0.9:
                contents.append((_T.BOWEL_GAS, level, False, None, 0.0))
            else:
                contents.append((_T.BOWEL_FLUID, level, True, None, 0.0))
        elif loop["kind"] == "collapsed":
            contents.append((_T.BOWEL_FLUID, level, False, None, 0.0))
        else:
            fluid = _T.ORAL_CONTRAST if (patient.oral_contrast and rng.random() < 0.7) else _T.BOWEL_FLUID
            roll = rng.random()
            if roll < 0.45:
                contents.append((fluid, level, False, None, 0.0))
            elif roll < 0.8:
                contents.append((fluid, level, True, None, 0.0))  # air-fluid level
            else:
                contents.append((_T.BOWEL_GAS, level, False, None, 0.0))
    return contents


def _direction(rng: np.random.Generator, cfg: PhantomConfig, tilt: bool | None) -> tuple[np.ndarray, float, float]:
    if tilt is None:
        tilt = bool(rng.random() < cfg.tilt_probability)
    if not tilt:
        return np.eye(3), 0.0, 0.0
    roll = rng.random()
    gantry = _u(rng, cfg.gantry_tilt_deg) * (1 if rng.random() < 0.5 else -1) if roll < 0.8 else 0.0
    si = _u(rng, cfg.si_rotation_deg) * (1 if rng.random() < 0.5 else -1) if roll >= 0.6 else 0.0
    return _rot_z(math.radians(si)) @ _rot_x(math.radians(gantry)), gantry, si


def _node_extent_box(patient: _Patient, scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo = np.full(3, np.inf)
    hi = np.full(3, -np.inf)
    for node, s in zip(patient.nodes, scale):
        r = node["bound"]  # already allows for the largest size change
        lo = np.minimum(lo, node["centre"] - r)
        hi = np.maximum(hi, node["centre"] + r)
    return lo, hi


def _grid(patient: _Patient, rotation: np.ndarray, translation: np.ndarray, direction: np.ndarray, spacing_xy: float,
          thickness: float, margins: tuple[float, float, float], node_scale: np.ndarray, clinical: tuple[int, int] | None):
    """Origin and size of a grid with the given axes covering the body in-plane and the nodes in z."""
    (bx0, by0), (bx1, by1) = patient.body_box
    nlo, nhi = _node_extent_box(patient, node_scale)
    xy_margin, z_lo_margin, z_hi_margin = margins
    z0, z1 = nlo[2] - z_lo_margin, nhi[2] + z_hi_margin

    def to_image_axes(points_patient: np.ndarray) -> np.ndarray:
        lps = points_patient @ rotation.T + translation
        return lps @ direction  # coordinates along the image axes

    body = np.array([[x, y, z] for x in (bx0 - xy_margin, bx1 + xy_margin) for y in (by0 - xy_margin, by1 + xy_margin) for z in (z0, z1)])
    nodes = np.array([[x, y, z] for x in (nlo[0], nhi[0]) for y in (nlo[1], nhi[1]) for z in (z0, z1)])
    u_body = to_image_axes(body)
    u_nodes = to_image_axes(nodes)
    lo = np.array([u_body[:, 0].min(), u_body[:, 1].min(), u_nodes[:, 2].min()])
    hi = np.array([u_body[:, 0].max(), u_body[:, 1].max(), u_nodes[:, 2].max()])
    spacing = np.array([spacing_xy, spacing_xy, thickness])
    if clinical is not None:
        matrix, slices = clinical
        size = np.array([matrix, matrix, slices])
        centre = (lo + hi) / 2.0
        lo = centre - (size - 1) / 2.0 * spacing
    else:
        size = np.floor((hi - lo) / spacing).astype(int) + 2
    origin = direction @ lo
    return origin, tuple(int(s) for s in size), spacing


def estimated_case_mb(voxels: int, noise_sigma_hu: float) -> float:
    """Compressed NRRD size (CT + labels) of a phantom study, in MB: gzip needs about
    7.4 + 0.6 log2(sigma) bits per int16 voxel of CT with noise sigma (fitted on phantoms)."""
    return voxels * (7.4 + 0.6 * math.log2(max(noise_sigma_hu, 1.0))) / 8.0 / 1e6 + 0.02


def _sample_study(rng: np.random.Generator, cfg: PhantomConfig, patient: _Patient, first: bool, *, clinical: bool = False,
                  spacing_mm: float | None = None, slice_thickness_mm: float | None = None, tilt: bool | None = None) -> _Study:
    rotation = _rot_z(math.radians(_u(rng, cfg.patient_rotation_deg)))
    translation = np.array([_u(rng, cfg.table_shift_mm), _u(rng, cfg.table_shift_mm), _u(rng, (-250.0, -50.0))])
    if first:
        node_scale = np.ones(len(patient.nodes))
    else:
        node_scale = rng.uniform(cfg.node_size_change[0], cfg.node_size_change[1], len(patient.nodes))
    direction, gantry, si = _direction(rng, cfg, False if clinical and tilt is None else tilt)
    noise_sigma = _u(rng, cfg.noise_sigma_hu)
    margins = (_u(rng, cfg.fov_margin_mm), _u(rng, cfg.z_margin_mm), _u(rng, cfg.z_margin_mm))
    if clinical:
        spacing_xy = spacing_mm or _u(rng, cfg.clinical_spacing_xy_mm)
        thickness = slice_thickness_mm or cfg.clinical_slice_thickness_mm
        origin, size, spacing = _grid(patient, rotation, translation, direction, spacing_xy, thickness, margins, node_scale,
                                      (cfg.clinical_matrix, cfg.clinical_slices))
    else:
        # Voxel budget: first narrow the z margins, then redraw the pixel size, then the thickness.
        choices = np.array(cfg.slice_thickness_choices_mm, dtype=float)
        thickness = slice_thickness_mm or float(choices[int(rng.integers(len(choices)))])
        spacing_xy = spacing_mm or _u(rng, cfg.spacing_xy_mm)
        for attempt in range(30):
            origin, size, spacing = _grid(patient, rotation, translation, direction, spacing_xy, thickness, margins, node_scale, None)
            if int(np.prod(size)) <= cfg.max_voxels and estimated_case_mb(int(np.prod(size)), noise_sigma) <= cfg.max_case_mb:
                break
            if attempt == 0:
                margins = (margins[0], min(margins[1], cfg.z_margin_mm[0] / 2), min(margins[2], cfg.z_margin_mm[0] / 2))
            elif attempt < 12 and spacing_mm is None:
                spacing_xy = _u(rng, (spacing_xy, cfg.spacing_xy_mm[1]))
            elif slice_thickness_mm is None and thickness < choices.max():
                thickness = float(choices[choices > thickness][int(rng.integers(int((choices > thickness).sum())))])
            else:
                break
    n_sub = max(1, int(math.ceil(thickness / cfg.supersample_step_mm - 1e-6)))
    scanner = {
        "spacing_mm": [float(s) for s in spacing],
        "size": list(size),
        "slice_thickness_mm": float(thickness),
        "gantry_tilt_deg": float(gantry),
        "si_rotation_deg": float(si),
        "tilted": bool(gantry or si),
        "psf_sigma_mm": _u(rng, cfg.psf_sigma_mm),
        "noise_sigma_hu": noise_sigma,
        "noise_correlation_px": _u(rng, cfg.noise_correlation_px),
        # no draw with one kernel, so the default config keeps its random streams
        "noise_kernel": cfg.noise_kernels[int(rng.integers(len(cfg.noise_kernels)))] if len(cfg.noise_kernels) > 1 else cfg.noise_kernels[0],
        "z_supersampling": n_sub,
        "patient_rotation_deg": float(math.degrees(math.atan2(rotation[1, 0], rotation[0, 0]))),
    }
    return _Study(
        rotation=rotation, translation=translation, origin=origin, direction=direction, spacing=spacing, size=size, n_sub=n_sub,
        scanner=scanner, lut=_hu_table(rng, cfg, patient), contents=_bowel_contents(rng, patient), node_scale=node_scale,
        jitter_vox=_u(rng, cfg.annotator_jitter_vox), bias_vox=_u(rng, cfg.annotator_bias_vox),
    )


# ------------------------------------------------------------------------------------------------
# rendering


def _study_node_shape(node: dict, scale: float) -> _NodeShape:
    necrosis = node["necrosis"]
    hilum = node["hilum"]
    if hilum is not None:
        hilum = (hilum[0] * scale, hilum[1] * scale)
    return _NodeShape(node["centre"], node["axes"], node["semi"] * scale, node["irr"], necrosis, hilum)


def _table_for(anat: dict, rotation: np.ndarray) -> _Table:
    """The table touches the lowest point of the (rotated) back, plus the patient's gap."""
    angles = np.linspace(0.0, math.pi, 181)
    radius = _body_profile(anat, angles)["body"]
    outline = np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)
    lowest = float((outline @ rotation[:2, :2].T)[:, 1].max())
    gap = anat["table_y"] - anat["body"]["b_post"]
    return _Table(rotation, lowest + gap, anat["table_t"], anat["body"]["a"] + 30.0)


def _render(patient: _Patient, study: _Study, rng: np.random.Generator, return_tissue: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, list]:
    ni, nj, nk = study.size
    n_sub = study.n_sub
    # fine grid in the patient frame: sub-slices at k + (m + 0.5) / n_sub - 0.5
    affine_lps = study.direction @ np.diag(study.spacing)
    fine_affine_lps = affine_lps @ np.diag([1.0, 1.0, 1.0 / n_sub])
    fine_origin_lps = study.origin + affine_lps @ np.array([0.0, 0.0, (0.5 / n_sub) - 0.5])
    to_patient = study.rotation.T
    grid = _GridTarget(to_patient @ (fine_origin_lps - study.translation), to_patient @ fine_affine_lps, (nk * n_sub, nj, ni))

    anat = patient.anatomy
    node_prims = []
    shapes = []
    for index, (node, scale) in enumerate(zip(patient.nodes, study.node_scale)):
        shape = _study_node_shape(node, float(scale))
        shapes.append(shape)
        node_prims.append(_Node(shape, NODE_FIRST + index, node["base_hu"] + _u(rng, (-3, 3)), node["field"], node["texture_hu"],
                                node["necrosis_hu"], node["rim_hu"]))
    table = _table_for(anat, study.rotation)
    prims = [patient.raster, table] + _anatomy_prims(anat) + _bowel_prims(patient.bowel, study.contents) + _branch_prims(patient.mesenteric) + node_prims
    _paint(prims, grid)
    lut = study.lut.copy()
    for index, prim in enumerate(node_prims):
        lut[NODE_FIRST + index] = prim.base_hu
    grid.hu = lut[grid.mat]
    _texture(prims, grid)
    hu = grid.hu.reshape(nk, n_sub, nj, ni).mean(axis=1, dtype=np.float32) if n_sub > 1 else grid.hu
    tissue = grid.mat[n_sub // 2 :: n_sub].copy() if return_tissue else None

    # labels: the annotator's outline on each slice, partial-volume threshold over the slab
    labels = np.zeros((nk, nj, ni), dtype=np.uint16)
    e_i = grid.affine[:, 0] / np.linalg.norm(grid.affine[:, 0])
    e_j = grid.affine[:, 1] / np.linalg.norm(grid.affine[:, 1])
    jitter_mm = study.jitter_vox * float(study.spacing[0])
    bias_mm = study.bias_vox * float(study.spacing[0])
    values = [node["label_value"] for node in patient.nodes]
    to_index = np.linalg.inv(affine_lps)
    for index, shape in enumerate(shapes):
        value = int(values[index])
        coef = rng.standard_normal((nk, 3)) * np.array([0.6, 0.55, 0.45])
        phases = rng.uniform(0, 2 * math.pi, (nk, 2))
        r = shape.bounding_radius + 2.0 * float(study.spacing.max())
        bounds = grid.region(shape.c - r, shape.c + r, k_align=n_sub)
        if bounds is not None:
            i0, i1, j0, j1, k0, k1 = bounds
            x, y, z = grid.coords(bounds)
            inside, rho, outline, u, v = shape.inside(x, y, z)
            dx, dy, dz = x - np.float32(shape.c[0]), y - np.float32(shape.c[1]), z - np.float32(shape.c[2])
            dist = np.sqrt(dx * dx + dy * dy + dz * dz)
            signed = dist * (1.0 - outline / rho)  # radial distance to the outline, < 0 inside
            theta = np.arctan2(dx * e_j[0] + dy * e_j[1] + dz * e_j[2], dx * e_i[0] + dy * e_i[1] + dz * e_i[2])
            ks = (np.arange(k0, k1) // n_sub)[:, None, None]
            c0, c1, c2 = coef[ks, 0], coef[ks, 1], coef[ks, 2]
            p1, p2 = phases[ks, 0], phases[ks, 1]
            eps = jitter_mm * (c0 + c1 * np.cos(theta - p1) + c2 * np.cos(2 * theta - p2)) + bias_mm
            drawn = np.broadcast_to(signed <= eps.astype(np.float32), (k1 - k0, j1 - j0, i1 - i0))
            fraction = drawn.reshape((k1 - k0) // n_sub, n_sub, j1 - j0, i1 - i0).mean(axis=1)
            peak = float(fraction.max())
            if peak > 0:
                threshold = min(0.5, 0.6 * peak)
                target = labels[k0 // n_sub : k1 // n_sub, j0:j1, i0:i1]
                np.copyto(target, np.uint16(value), where=(fraction >= threshold) & (target == 0))
        centre_lps = study.rotation @ shape.c + study.translation
        ci, cj, ck = np.rint(to_index @ (centre_lps - study.origin)).astype(int)
        if 0 <= ci < ni and 0 <= cj < nj and 0 <= ck < nk:
            labels[ck, cj, ci] = value
        if bounds is not None:
            _keep_one_piece(labels[k0 // n_sub : k1 // n_sub, j0:j1, i0:i1], value, (ck - k0 // n_sub, cj - j0, ci - i0))
    return hu, labels, tissue, [int(v) for v in values]


def _keep_one_piece(region: np.ndarray, value: int, centre_kji: tuple[int, int, int]) -> None:
    """An annotator draws one connected node: drop stray islands (26-connectivity) of `value`,
    keeping the piece that holds the centre voxel (else the largest)."""
    pieces, count = ndimage.label(region == value, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return
    k, j, i = centre_kji
    inside = 0 <= k < region.shape[0] and 0 <= j < region.shape[1] and 0 <= i < region.shape[2]
    keep = int(pieces[k, j, i]) if inside else 0
    if keep == 0:
        keep = int(np.argmax(np.bincount(pieces.ravel())[1:])) + 1
    region[(pieces != keep) & (pieces > 0)] = 0


def _finish_ct(hu: np.ndarray, study: _Study, rng: np.random.Generator) -> np.ndarray:
    sx = float(study.spacing[0])
    sigma_px = study.scanner["psf_sigma_mm"] / sx
    hu = ndimage.gaussian_filter(hu, sigma=(0.0, sigma_px, sigma_px), mode="nearest")
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    corr = study.scanner["noise_correlation_px"]
    smooth = ndimage.gaussian_filter(noise, sigma=(0.0, corr, corr), mode="wrap")
    if study.scanner.get("noise_kernel", "smooth") == "sharp":
        # band-pass: the fine grain minus its coarse part, a noise power spectrum peaked at mid
        # frequencies as a sharp reconstruction kernel gives (rescaled to the study's sigma below)
        noise = smooth - ndimage.gaussian_filter(noise, sigma=(0.0, 3.0 * corr, 3.0 * corr), mode="wrap")
    else:
        noise = smooth
    noise *= np.float32(study.scanner["noise_sigma_hu"] / max(float(noise.std()), 1e-6))
    hu += noise
    np.clip(hu, -1024.0, 3071.0, out=hu)
    return np.rint(hu).astype(np.int16)


def _image(array: np.ndarray, study: _Study) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetOrigin([float(v) for v in study.origin])
    image.SetSpacing([float(v) for v in study.spacing])
    image.SetDirection([float(v) for v in study.direction.flatten()])
    return image


def _node_truth(node: dict, shape: _NodeShape, scale: float, study: _Study, value: int) -> dict:
    axes_lps = study.rotation @ shape.axes
    long_axis, short_axis = _axial_axes(axes_lps, shape.semi)
    centre = study.rotation @ shape.c + study.translation
    semi = shape.semi
    return {
        "label_value": value,
        "metastatic": int(node["metastatic"]),
        "station": node["station"],
        "centre_lps": [round(float(v), 4) for v in centre],
        "semi_axes_mm": [round(float(v), 4) for v in semi],
        "axes_lps": [[round(float(v), 6) for v in axes_lps[:, a]] for a in range(3)],
        "short_axis_mm": round(short_axis, 4),
        "long_axis_mm": round(long_axis, 4),
        "short_axis_3d_mm": round(2.0 * float(semi.min()), 4),
        "long_axis_3d_mm": round(2.0 * float(semi.max()), 4),
        "long_short_ratio": round(float(semi.max() / semi.min()), 4),
        "irregularity": round(float(node["irregularity"]), 4),
        "necrosis": node["necrosis"] is not None,
        "fatty_hilum": node["hilum"] is not None,
        "mean_hu": round(float(node["base_hu"]), 2),
        "size_scale": round(float(scale), 4),
    }


def _render_case(patient: _Patient, study: _Study, rng: np.random.Generator, return_tissue: bool) -> PhantomCase:
    hu, labels, tissue, values = _render(patient, study, rng, return_tissue)
    ct = _finish_ct(hu, study, rng)
    truths = []
    for index, (node, scale) in enumerate(zip(patient.nodes, study.node_scale)):
        truths.append(_node_truth(node, _study_node_shape(node, float(scale)), float(scale), study, values[index]))
    truths.sort(key=lambda t: t["label_value"])
    labels_image = _image(labels, study)
    counts = np.bincount(labels.ravel(), minlength=len(truths) + 1)
    for truth in truths:
        truth["voxel_count"] = int(counts[truth["label_value"]])
    return PhantomCase(
        ct=_image(ct, study),
        labels=labels_image,
        nodes=truths,
        scanner=dict(study.scanner),
        tissue=_image(tissue, study) if tissue is not None else None,
    )


def _as_rng(rng_or_seed) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    if isinstance(rng_or_seed, (bool, float)) or rng_or_seed is None:
        raise InputError("The phantom seed must be a non-negative integer or a numpy Generator; pass e.g. seed=1.")
    if isinstance(rng_or_seed, (int, np.integer)) and rng_or_seed < 0:
        raise InputError("The phantom seed must be a non-negative integer; pass e.g. seed=1.")
    return np.random.default_rng(rng_or_seed)
