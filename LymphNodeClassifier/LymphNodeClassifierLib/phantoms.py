"""Abdominal CT phantoms with benign and metastatic lymph nodes: the project's training and test data.

The phantom is continuous geometry in a patient frame (mm, LPS axes: +x patient left, +y
posterior, +z superior; origin near the front of L2/L3 on the midline). Each study places the
patient on the table (a translation and a small rotation about S-I) and renders the geometry onto
its scanner grid (origin, spacing, direction; optionally gantry-tilted) by evaluating tissues at
voxel centres, with z-supersampling for slices thicker than `supersample_step_mm` (partial-volume
averaging over the slice thickness). Then in-plane blur (the scanner's PSF) and spatially
correlated Gaussian noise are applied, and the result is rounded to int16 HU.

Anatomy (HU ranges in `PhantomConfig`): air, table, skin, subcutaneous fat, abdominal wall muscles
(rectus with linea alba, obliques), paraspinal and quadratus lumborum muscles, psoas (growing
inferiorly), lumbar vertebrae (cortical rim, cancellous core, discs, canal, lamina, spinous and
transverse processes), aorta (contrast, wall, optional calcified plaques), IVC, SMA/SMV with
mesenteric branches, renal arteries and veins (the left renal vein passes between aorta and SMA),
kidneys (cortex, medulla, sinus fat, pelvis), the lower liver and spleen, gallbladder, colon
(feces with gas bubbles, gas caps) and small-bowel loops (fluid, gas, air-fluid levels, optional
oral contrast, collapsed loops), visceral fat everywhere else inside the abdominal wall.

Lymph nodes (2-12 per patient) sit in retroperitoneal (para-aortic, aortocaval, paracaval,
pre-aortic, retrocaval) or mesenteric fat, never touching organs or each other:
- benign: oval / reniform (long/short 1.5-2.5), smooth, homogeneous 20-45 HU, fatty hilum in 60 %;
- metastatic: round (1.0-1.4), lobulated margin (low-frequency radial harmonics), heterogeneous
  30-90 HU, central necrosis (0-20 HU) in 35 %, no hilum.
Short axes overlap between classes (log-normal, see the config) so the short-axis rule alone gives
a ROC AUC of about 0.7, as for colorectal cancer.

Truth per node: `short_axis_mm` / `long_axis_mm` are the radiology axes of the node's base
ellipsoid in the patient-axial plane (its central axial section is its largest), i.e. what
`nodes.extract_nodes` measures on a perfect mask; `short_axis_3d_mm` / `long_axis_3d_mm` are the
smallest / largest ellipsoid diameters.

Masks imitate an annotator: every node has its own label value 1..n (uint16 map); the outline is
the node shape with a per-slice random radial perturbation of about 0.5-1 voxel (a smooth angular
function, redrawn on every slice, plus a per-case bias), a voxel is labelled when at least half of
its slab is inside that outline (less for nodes thinner than half a slice), and the voxel holding
the node centre is always labelled.

Patients with several studies (25 %): same anatomy and nodes (node sizes change by up to 7 %),
another scanner, another table position, another contrast timing and bowel content.

Label noise in cohorts: exactly `round(label_noise * n_nodes)` node records (over the whole
cohort, each study's node counted on its own) get their `metastatic` flipped, chosen with a
generator seeded from the cohort seed; `true_metastatic` keeps the truth and
`label_flipped` == (metastatic != true_metastatic).

Everything is deterministic for a seed (numpy Generators only, no global state). Patient `p` of a
cohort with seed `s` uses `default_rng([s, p])` and its study `t` uses `default_rng([s, p, 1000 + t])`,
so a smaller cohort with the same seed is a prefix of a larger one.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .cli import exit_code
from .dataset import DATASET_FILE, Dataset, _now_iso
from .errors import InputError
from .fileio import atomic_path

PHANTOM_VERSION = 1

# ------------------------------------------------------------------------------------------------
# tissues (values of the optional tissue map; node i of a case has tissue NODE_FIRST + i)

TISSUES: dict[str, int] = {
    "air": 0,
    "table": 1,
    "skin": 2,
    "subcutaneous_fat": 3,
    "muscle": 4,  # abdominal wall
    "paraspinal": 5,  # erector spinae and quadratus lumborum
    "psoas": 6,
    "visceral_fat": 7,
    "bone_cortical": 8,
    "bone_cancellous": 9,
    "disc": 10,
    "csf": 11,
    "aorta": 12,
    "ivc": 13,
    "artery": 14,
    "vein": 15,
    "vessel_wall": 16,
    "calcification": 17,
    "liver": 18,
    "gallbladder": 19,
    "spleen": 20,
    "kidney_cortex": 21,
    "kidney_medulla": 22,
    "renal_sinus_fat": 23,
    "urine": 24,
    "bowel_wall": 25,
    "bowel_gas": 26,
    "bowel_fluid": 27,
    "oral_contrast": 28,
    "feces": 29,
    "node_necrosis": 30,
    "node_hilum_fat": 31,
}
NODE_FIRST = 100  # tissue of node i (0-based) is NODE_FIRST + i
_T = type("_T", (), {name.upper(): value for name, value in TISSUES.items()})


def _lut(*tissues: int) -> np.ndarray:
    table = np.zeros(256, dtype=bool)
    table[list(tissues)] = True
    return table


_OVER_FAT = _lut(_T.VISCERAL_FAT)
_OVER_FAT_WALL = _lut(_T.VISCERAL_FAT, _T.BOWEL_WALL)
_OVER_SOFT = _lut(_T.VISCERAL_FAT, _T.MUSCLE, _T.PSOAS, _T.PARASPINAL)


# ------------------------------------------------------------------------------------------------
# configuration


@dataclass
class PhantomConfig:
    """Every range the generator draws from ((low, high) uniform unless said otherwise)."""

    # scanner
    spacing_xy_mm: tuple[float, float] = (0.6, 0.98)
    slice_thickness_choices_mm: tuple[float, ...] = (0.8, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0)
    supersample_step_mm: float = 1.25  # z sub-sample step for partial-volume averaging
    psf_sigma_mm: tuple[float, float] = (0.6, 1.2)  # in-plane Gaussian blur (sigma)
    noise_sigma_hu: tuple[float, float] = (8.0, 25.0)
    noise_correlation_px: tuple[float, float] = (0.5, 0.9)  # in-plane smoothing of the noise (sigma, pixels)
    tilt_probability: float = 0.2  # cases with a non-identity direction matrix
    gantry_tilt_deg: tuple[float, float] = (5.0, 20.0)  # about the L-R axis
    si_rotation_deg: tuple[float, float] = (1.0, 6.0)  # about the S-I axis
    fov_margin_mm: tuple[float, float] = (3.0, 10.0)  # air around the body (in-plane)
    z_margin_mm: tuple[float, float] = (6.0, 12.0)  # above / below the outermost nodes
    max_case_mb: float = 4.8  # estimated compressed size (noise-dependent); over it: narrower z margins,
    max_voxels: int = 5_000_000  # then coarser pixels, then thicker slices
    # patient placement per study
    table_shift_mm: tuple[float, float] = (-10.0, 10.0)
    patient_rotation_deg: tuple[float, float] = (-3.0, 3.0)  # about S-I
    # patients
    multi_study_probability: float = 0.25
    studies_per_multi: tuple[int, int] = (2, 3)
    node_size_change: tuple[float, float] = (0.93, 1.07)  # per node and later study
    # nodes
    nodes_per_case: tuple[int, int] = (2, 12)
    node_negative_patient_probability: float = 0.3  # patients with benign nodes only
    metastatic_fraction_positive: tuple[float, float] = (0.5, 1.0)  # in node-positive patients
    node_band_mm: tuple[float, float] = (15.0, 40.0)  # S-I extent of node centres
    retroperitoneal_probability: float = 0.6  # else mesenteric
    benign_short_axis_median_mm: float = 5.3
    benign_short_axis_log_sigma: float = 0.32
    metastatic_short_axis_median_mm: float = 7.45
    metastatic_short_axis_log_sigma: float = 0.36
    short_axis_range_mm: tuple[float, float] = (3.0, 18.0)
    benign_long_short_ratio: tuple[float, float] = (1.5, 2.5)
    metastatic_long_short_ratio: tuple[float, float] = (1.0, 1.4)
    benign_hu: tuple[float, float] = (20.0, 45.0)
    metastatic_hu: tuple[float, float] = (40.0, 70.0)  # base; texture adds +-25 (30..90)
    metastatic_texture_hu: tuple[float, float] = (8.0, 16.0)  # std of the texture
    necrosis_probability: float = 0.35
    necrosis_hu: tuple[float, float] = (0.0, 20.0)
    necrosis_scale: tuple[float, float] = (0.35, 0.6)  # of the node's semi-axes
    fatty_hilum_probability: float = 0.6
    benign_irregularity: tuple[float, float] = (0.0, 0.03)  # radial perturbation amplitude
    metastatic_irregularity: tuple[float, float] = (0.08, 0.2)
    node_gap_mm: float = 8.0  # between node outlines (keeps masks apart on 5 mm slices)
    node_clearance_mm: float = 1.5  # fat between a node and any organ / vessel / bowel
    annotator_jitter_vox: tuple[float, float] = (0.5, 1.0)  # std of the outline perturbation
    annotator_bias_vox: tuple[float, float] = (-0.2, 0.4)  # per case (annotators tend to include the rim)
    # tissue HU (per study; contrast timing interpolates arterial -> portal venous)
    air_hu: float = -1000.0
    subcutaneous_fat_hu: tuple[float, float] = (-115.0, -95.0)
    visceral_fat_hu: tuple[float, float] = (-110.0, -88.0)
    muscle_hu: tuple[float, float] = (40.0, 60.0)
    skin_hu: tuple[float, float] = (20.0, 50.0)
    aorta_hu: tuple[float, float] = (150.0, 250.0)
    ivc_hu: tuple[float, float] = (100.0, 150.0)
    liver_hu: tuple[float, float] = (60.0, 110.0)  # low in late-arterial, high in portal-venous timing
    kidney_cortex_hu: tuple[float, float] = (140.0, 200.0)
    cortical_bone_hu: tuple[float, float] = (700.0, 1000.0)
    cancellous_bone_hu: tuple[float, float] = (200.0, 300.0)
    bowel_fluid_hu: tuple[float, float] = (0.0, 25.0)
    oral_contrast_probability: float = 0.25  # patients with positive oral contrast
    # clinical-size cases (benchmarks)
    clinical_matrix: int = 512
    clinical_slices: int = 110
    clinical_spacing_xy_mm: tuple[float, float] = (0.7, 0.8)
    clinical_slice_thickness_mm: float = 1.25
    clinical_nodes: int = 10

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


# ------------------------------------------------------------------------------------------------
# results


@dataclass
class PhantomCase:
    """One rendered study."""

    ct: sitk.Image  # int16 HU
    labels: sitk.Image  # uint16, node i has value nodes[i]["label_value"]
    nodes: list[dict]  # truth per node (JSON-ready)
    scanner: dict  # spacing, thickness, tilt, noise, ... (JSON-ready)
    tissue: sitk.Image | None = None  # uint8 tissue map (TISSUES, NODE_FIRST + i) when asked for
    patient_id: str = ""
    case_id: str = ""


# ------------------------------------------------------------------------------------------------
# small helpers


def _u(rng: np.random.Generator, bounds: Sequence[float]) -> float:
    low, high = float(bounds[0]), float(bounds[1])
    return low + (high - low) * float(rng.random()) if high > low else low


def _rot_x(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _rot_y(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rot_z(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _random_unit(rng: np.random.Generator) -> np.ndarray:
    return _unit(rng.standard_normal(3))


def _fibonacci_sphere(n: int) -> np.ndarray:
    k = np.arange(n) + 0.5
    polar = np.arccos(1.0 - 2.0 * k / n)
    azimuth = math.pi * (1.0 + 5.0**0.5) * k
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1)


_SPHERE = _fibonacci_sphere(96)
_SPHERE_INNER = _fibonacci_sphere(24) * 0.55


class _CosField:
    """A smooth random field: sum of plane cosines (unit variance), continuous in patient space."""

    def __init__(self, rng: np.random.Generator, n: int, wavelength_mm: tuple[float, float]):
        self.k = np.stack([_random_unit(rng) * (2.0 * math.pi / _u(rng, wavelength_mm)) for _ in range(n)])
        self.phase = rng.uniform(0.0, 2.0 * math.pi, n)
        self.norm = math.sqrt(2.0 / n)

    def __call__(self, x, y, z):
        total = 0.0
        for (kx, ky, kz), phase in zip(self.k, self.phase):
            total = total + np.cos(kx * x + ky * y + kz * z + phase)
        return total * self.norm


class _Harmonics:
    """Low-frequency function on the unit sphere (radial perturbation of a node outline)."""

    def __init__(self, rng: np.random.Generator, amplitude: float, n: int = 4, freq: tuple[float, float] = (2.0, 4.5)):
        self.w = np.stack([_random_unit(rng) for _ in range(n)])
        self.f = rng.uniform(freq[0], freq[1], n)
        self.phase = rng.uniform(0.0, 2.0 * math.pi, n)
        weights = rng.uniform(0.5, 1.0, n)
        self.a = amplitude * weights / weights.sum() * 1.6
        self.max = float(np.abs(self.a).sum())

    def __call__(self, ux, uy, uz):
        total = 0.0
        for (wx, wy, wz), f, phase, a in zip(self.w, self.f, self.phase, self.a):
            total = total + a * np.sin(f * (wx * ux + wy * uy + wz * uz) + phase)
        return total


# ------------------------------------------------------------------------------------------------
# evaluation targets: a (fine) voxel grid or a list of points, both in the patient frame


class _GridTarget:
    """Tissue ids on a grid p = origin + A @ (i, j, k); arrays indexed [k, j, i]."""

    def __init__(self, origin: np.ndarray, affine: np.ndarray, shape_kji: tuple[int, int, int]):
        self.origin = np.asarray(origin, dtype=float)
        self.affine = np.asarray(affine, dtype=float)
        self.inverse = np.linalg.inv(self.affine)
        self.shape = shape_kji
        self.mat = np.zeros(shape_kji, dtype=np.uint8)
        self.hu: np.ndarray | None = None
        self.is_view = True

    def region(self, lo, hi, k_align: int = 1):
        lo = np.asarray(lo, dtype=float)
        hi = np.asarray(hi, dtype=float)
        nk, nj, ni = self.shape
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
            return (0, ni, 0, nj, 0, nk)
        corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        index = (corners - self.origin) @ self.inverse.T
        i0, j0, k0 = np.floor(index.min(axis=0)).astype(int) - 1
        i1, j1, k1 = np.ceil(index.max(axis=0)).astype(int) + 2
        i0, j0, k0 = max(i0, 0), max(j0, 0), max(k0, 0)
        i1, j1, k1 = min(i1, ni), min(j1, nj), min(k1, nk)
        if k_align > 1:
            k0 = (k0 // k_align) * k_align
            k1 = min(-(-k1 // k_align) * k_align, nk)
        if i0 >= i1 or j0 >= j1 or k0 >= k1:
            return None
        return (i0, i1, j0, j1, k0, k1)

    def coords(self, bounds):
        i0, i1, j0, j1, k0, k1 = bounds
        axes = (
            np.arange(i0, i1, dtype=np.float32)[None, None, :],
            np.arange(j0, j1, dtype=np.float32)[None, :, None],
            np.arange(k0, k1, dtype=np.float32)[:, None, None],
        )
        out = []
        for row in range(3):
            value = None
            for col in range(3):
                coef = self.affine[row, col]
                if abs(coef) > 1e-9:
                    term = np.float32(coef) * axes[col]
                    value = term if value is None else value + term
            out.append(value + np.float32(self.origin[row]))
        return out

    def block(self, lo, hi):
        bounds = self.region(lo, hi)
        if bounds is None:
            return None
        i0, i1, j0, j1, k0, k1 = bounds
        return (slice(k0, k1), slice(j0, j1), slice(i0, i1)), *self.coords(bounds)


class _PointTarget:
    """Tissue ids at a list of points (N, 3)."""

    def __init__(self, points: np.ndarray):
        self.points = np.asarray(points, dtype=float).reshape(-1, 3)
        self.mat = np.zeros(len(self.points), dtype=np.uint8)
        self.hu = None
        self.is_view = False

    def block(self, lo, hi):
        inside = np.all((self.points >= lo) & (self.points <= hi), axis=1)
        index = np.nonzero(inside)[0]
        if index.size == 0:
            return None
        p = self.points[index]
        return index, p[:, 0], p[:, 1], p[:, 2]


def _put(m: np.ndarray, tissue: int, mask, over: np.ndarray | None = None) -> None:
    if over is not None:
        mask = mask & over[m]
    np.copyto(m, np.uint8(tissue), where=mask)


# ------------------------------------------------------------------------------------------------
# primitives (each paints tissue ids over its bounding box; later primitives win)


class _Prim:
    lo = np.full(3, -np.inf)
    hi = np.full(3, np.inf)

    def paint(self, x, y, z, m) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def texture(self, x, y, z, m, hu) -> None:
        """Optional: add texture to `hu` (float32) where this primitive's tissue is."""


class _CrossSection(_Prim):
    """The z-invariant body cross-section (a raster in the patient's x, y), painted first."""

    def __init__(self, raster: np.ndarray, x0: float, y0: float, res: float):
        self.raster, self.x0, self.y0, self.res = raster, x0, y0, res

    def paint(self, x, y, z, m):
        ny, nx = self.raster.shape
        ix = np.rint((x - self.x0) / self.res).astype(np.int32)
        iy = np.rint((y - self.y0) / self.res).astype(np.int32)
        outside = (ix < 0) | (ix >= nx) | (iy < 0) | (iy >= ny)
        values = self.raster[np.clip(iy, 0, ny - 1), np.clip(ix, 0, nx - 1)]
        values = np.where(outside, np.uint8(_T.AIR), values)
        np.copyto(m, values)


class _Ellipsoid(_Prim):
    """Rotated ellipsoid with layers [(tissue, shrink_mm, over_lut)], painted in order."""

    def __init__(self, centre, axes, semi, layers, clip_lut=None):
        self.c = np.asarray(centre, dtype=float)
        self.axes = np.asarray(axes, dtype=float)  # columns = principal directions
        self.semi = np.asarray(semi, dtype=float)
        self.layers = layers
        extent = np.sqrt(((self.axes * self.semi) ** 2).sum(axis=1))
        self.lo, self.hi = self.c - extent, self.c + extent

    def local(self, x, y, z):
        dx, dy, dz = x - np.float32(self.c[0]), y - np.float32(self.c[1]), z - np.float32(self.c[2])
        return [np.float32(self.axes[0, a]) * dx + np.float32(self.axes[1, a]) * dy + np.float32(self.axes[2, a]) * dz for a in range(3)]

    def paint(self, x, y, z, m):
        u = self.local(x, y, z)
        for tissue, shrink, over in self.layers:
            s = np.maximum(self.semi - shrink, 0.3)
            q = (u[0] / np.float32(s[0])) ** 2 + (u[1] / np.float32(s[1])) ** 2 + (u[2] / np.float32(s[2])) ** 2
            _put(m, tissue, q <= 1.0, over)


class _Cylinder(_Prim):
    """Near-vertical elliptic cylinder: centre and semi-axes linear in z, optional z range and layers."""

    def __init__(self, centre_xy, semi_xy, layers, z0=0.0, slope_xy=(0.0, 0.0), grow_xy=(0.0, 0.0), z_range=(-400.0, 400.0)):
        self.c = np.asarray(centre_xy, dtype=float)
        self.semi = np.asarray(semi_xy, dtype=float)
        self.slope = np.asarray(slope_xy, dtype=float)
        self.grow = np.asarray(grow_xy, dtype=float)
        self.z0, self.z_range, self.layers = z0, z_range, layers
        zs = np.array(z_range, dtype=float)
        cx = self.c[0] + self.slope[0] * (zs - z0)
        cy = self.c[1] + self.slope[1] * (zs - z0)
        ax = self.semi[0] + np.abs(self.grow[0]) * np.abs(zs - z0).max()
        ay = self.semi[1] + np.abs(self.grow[1]) * np.abs(zs - z0).max()
        self.lo = np.array([cx.min() - ax, cy.min() - ay, zs[0]])
        self.hi = np.array([cx.max() + ax, cy.max() + ay, zs[1]])

    def centre_at(self, z: float) -> np.ndarray:
        return self.c + self.slope * (z - self.z0)

    def semi_at(self, z: float) -> np.ndarray:
        return np.maximum(self.semi + self.grow * (z - self.z0), 2.0)

    def paint(self, x, y, z, m):
        dz = z - np.float32(self.z0)
        cx = np.float32(self.c[0]) + np.float32(self.slope[0]) * dz if self.slope[0] else np.float32(self.c[0])
        cy = np.float32(self.c[1]) + np.float32(self.slope[1]) * dz if self.slope[1] else np.float32(self.c[1])
        within = (z >= self.z_range[0]) & (z <= self.z_range[1])
        for tissue, shrink, over in self.layers:
            ax = np.float32(self.semi[0] - shrink) + np.float32(self.grow[0]) * dz if self.grow[0] else np.float32(self.semi[0] - shrink)
            ay = np.float32(self.semi[1] - shrink) + np.float32(self.grow[1]) * dz if self.grow[1] else np.float32(self.semi[1] - shrink)
            ax = np.maximum(ax, np.float32(1.0))
            ay = np.maximum(ay, np.float32(1.0))
            q = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2
            _put(m, tissue, (q <= 1.0) & within, over)


class _Capsule(_Prim):
    """Segment a-b with radius r; layers [(tissue, shrink_mm, over_lut)]."""

    def __init__(self, a, b, radius, layers):
        self.a = np.asarray(a, dtype=float)
        self.b = np.asarray(b, dtype=float)
        self.r = float(radius)
        self.layers = layers
        self.lo = np.minimum(self.a, self.b) - self.r
        self.hi = np.maximum(self.a, self.b) + self.r

    def distance2(self, x, y, z):
        ab = self.b - self.a
        length2 = max(float(ab @ ab), 1e-9)
        dx, dy, dz = x - np.float32(self.a[0]), y - np.float32(self.a[1]), z - np.float32(self.a[2])
        t = (dx * np.float32(ab[0]) + dy * np.float32(ab[1]) + dz * np.float32(ab[2])) * np.float32(1.0 / length2)
        t = np.clip(t, 0.0, 1.0)
        return (dx - t * np.float32(ab[0])) ** 2 + (dy - t * np.float32(ab[1])) ** 2 + (dz - t * np.float32(ab[2])) ** 2

    def paint(self, x, y, z, m):
        d2 = self.distance2(x, y, z)
        for tissue, shrink, over in self.layers:
            r = max(self.r - shrink, 0.3)
            _put(m, tissue, d2 <= np.float32(r * r), over)


class _BowelLumen(_Capsule):
    """Lumen of one bowel segment: gas above the loop's (horizontal) level, the content below."""

    def __init__(self, a, b, radius, content: int, level_y: float, gas: bool, texture_field=None, texture_hu=0.0):
        super().__init__(a, b, radius, [])
        self.content, self.level_y, self.gas = content, level_y, gas
        self.field, self.texture_hu = texture_field, texture_hu

    def paint(self, x, y, z, m):
        inside = self.distance2(x, y, z) <= np.float32(self.r * self.r)
        if self.gas:
            _put(m, _T.BOWEL_GAS, inside & (y < np.float32(self.level_y)), _OVER_FAT_WALL)
            _put(m, self.content, inside & (y >= np.float32(self.level_y)), _OVER_FAT_WALL)
        else:
            _put(m, self.content, inside, _OVER_FAT_WALL)

    def texture(self, x, y, z, m, hu):
        if self.field is None:
            return
        mine = m == self.content
        if not mine.any():
            return
        value = self.field(x, y, z)
        value = np.broadcast_to(value, m.shape)
        # mottled feces: a soft texture plus gas bubbles where the field peaks
        shifted = np.where(value > 1.15, np.float32(-900.0), value * np.float32(self.texture_hu))
        hu[mine] += shifted[mine]


class _Kidney(_Ellipsoid):
    """Kidney: enhancing cortex, medullary pyramids (cones from the centre towards the lateral rim)."""

    def __init__(self, centre, axes, semi, cortex_mm: float, pyramids: np.ndarray):
        super().__init__(centre, axes, semi, [])
        self.cortex = cortex_mm
        self.pyramids = pyramids  # unit vectors in the kidney's normalized frame

    def paint(self, x, y, z, m):
        u = self.local(x, y, z)
        v = [u[a] / np.float32(self.semi[a]) for a in range(3)]
        q = v[0] * v[0] + v[1] * v[1] + v[2] * v[2]
        _put(m, _T.KIDNEY_CORTEX, q <= 1.0, _OVER_FAT)
        inner = np.maximum(self.semi - self.cortex, 1.0)
        w = [u[a] / np.float32(inner[a]) for a in range(3)]
        q_in = w[0] * w[0] + w[1] * w[1] + w[2] * w[2]
        norm = np.sqrt(q_in) + np.float32(1e-6)
        best = None
        for d in self.pyramids:
            cos = (w[0] * np.float32(d[0]) + w[1] * np.float32(d[1]) + w[2] * np.float32(d[2])) / norm
            best = cos if best is None else np.maximum(best, cos)
        pyramid = (q_in <= 1.0) & (q_in >= 0.12) & (best >= np.float32(0.93))
        np.copyto(m, np.uint8(_T.KIDNEY_MEDULLA), where=pyramid & (m == _T.KIDNEY_CORTEX))


class _Table(_Prim):
    """The scanner table: a slab fixed to the scanner, under the (possibly rotated) patient."""

    def __init__(self, rotation: np.ndarray, y_top: float, thickness: float, half_width: float):
        self.r = rotation
        self.y_top, self.thickness, self.half_width = y_top, thickness, half_width
        corners = np.array([[sx * half_width, y, 0.0] for sx in (-1, 1) for y in (y_top, y_top + thickness)])
        patient = corners @ rotation  # rows: R^T w
        self.lo = np.array([patient[:, 0].min(), patient[:, 1].min(), -np.inf])
        self.hi = np.array([patient[:, 0].max(), patient[:, 1].max(), np.inf])

    def paint(self, x, y, z, m):
        r = self.r
        wx = np.float32(r[0, 0]) * x + np.float32(r[0, 1]) * y
        wy = np.float32(r[1, 0]) * x + np.float32(r[1, 1]) * y
        slab = (wy >= np.float32(self.y_top)) & (wy <= np.float32(self.y_top + self.thickness)) & (np.abs(wx) <= np.float32(self.half_width))
        _put(m, _T.TABLE, slab, _lut(_T.AIR))


class _Vertebra(_Prim):
    """Lumbar spine: periodic vertebral bodies and discs, canal, posterior elements."""

    def __init__(self, p: dict):
        self.p = p
        x_extent = max(p["av"] + 2, p["tp_x"] + p["tp_a"])
        self.lo = np.array([-x_extent, p["yv"] - p["bv"] - 2.0, -400.0])
        self.hi = np.array([x_extent, p["sp_y"] + p["sp_b"], 400.0])

    def paint(self, x, y, z, m):
        p = self.p
        zz = np.mod(z - np.float32(p["phase"]), np.float32(p["period"]))
        in_disc = zz < np.float32(p["disc"])
        endplate = (zz < np.float32(p["disc"] + p["cort"])) | (zz > np.float32(p["period"] - p["cort"]))
        arch = (zz > np.float32(p["disc"] + 2.0)) & (zz < np.float32(p["period"] - 2.0))
        mid = np.abs(zz - np.float32((p["disc"] + p["period"]) / 2.0)) < np.float32(p["tp_half"])
        dy = y - np.float32(p["yv"])
        q = (x / np.float32(p["av"])) ** 2 + (dy / np.float32(p["bv"])) ** 2
        q_in = (x / np.float32(p["av"] - p["cort"])) ** 2 + (dy / np.float32(p["bv"] - p["cort"])) ** 2
        q_disc = (x / np.float32(p["av"] + 1.0)) ** 2 + (dy / np.float32(p["bv"] + 1.0)) ** 2
        _put(m, _T.DISC, (q_disc <= 1.0) & in_disc)
        _put(m, _T.BONE_CORTICAL, (q <= 1.0) & ~in_disc)
        _put(m, _T.BONE_CANCELLOUS, (q_in <= 1.0) & ~endplate)
        dyc = y - np.float32(p["yc"])
        ring = (x / np.float32(p["ca"] + p["arch"])) ** 2 + (dyc / np.float32(p["cb"] + p["arch"])) ** 2
        _put(m, _T.BONE_CORTICAL, (ring <= 1.0) & arch)
        for cx, cy, a, b, angle, where in (
            (0.0, p["sp_y"], p["sp_a"], p["sp_b"], 0.0, arch),
            (p["tp_x"], p["tp_y"], p["tp_a"], p["tp_b"], p["tp_angle"], mid),
            (-p["tp_x"], p["tp_y"], p["tp_a"], p["tp_b"], -p["tp_angle"], mid),
        ):
            ca_, sa_ = np.float32(math.cos(angle)), np.float32(math.sin(angle))
            lx = (x - np.float32(cx)) * ca_ + (y - np.float32(cy)) * sa_
            ly = -(x - np.float32(cx)) * sa_ + (y - np.float32(cy)) * ca_
            qq = (lx / np.float32(a)) ** 2 + (ly / np.float32(b)) ** 2
            _put(m, _T.BONE_CORTICAL, (qq <= 1.0) & where)
            qi = (lx / np.float32(max(a - 1.5, 0.8))) ** 2 + (ly / np.float32(max(b - 1.5, 0.8))) ** 2
            _put(m, _T.BONE_CANCELLOUS, (qi <= 1.0) & where)
        canal = (x / np.float32(p["ca"])) ** 2 + (dyc / np.float32(p["cb"])) ** 2
        _put(m, _T.CSF, canal <= 1.0)


class _NodeShape:
    """A node in the patient frame: a perturbed ellipsoid, optional necrotic core and fatty hilum."""

    def __init__(self, centre, axes, semi, irregularity: _Harmonics, necrosis=None, hilum=None):
        self.c = np.asarray(centre, dtype=float)
        self.axes = np.asarray(axes, dtype=float)
        self.semi = np.asarray(semi, dtype=float)
        self.irr = irregularity
        self.necrosis = necrosis  # (scale (3,), _Harmonics) or None
        self.hilum = hilum  # (centre offset in local coords (3,), semi (3,)) or None

    @property
    def bounding_radius(self) -> float:
        return float(self.semi.max() * (1.0 + self.irr.max))

    def local(self, x, y, z):
        dx, dy, dz = x - np.float32(self.c[0]), y - np.float32(self.c[1]), z - np.float32(self.c[2])
        return [np.float32(self.axes[0, a]) * dx + np.float32(self.axes[1, a]) * dy + np.float32(self.axes[2, a]) * dz for a in range(3)]

    def radial(self, x, y, z, scale=1.0):
        """(rho, outline) with rho the normalized radius and outline = 1 + delta(direction)."""
        u = self.local(x, y, z)
        v = [u[a] / np.float32(self.semi[a] * scale) for a in range(3)]
        rho = np.sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]) + np.float32(1e-6)
        return rho, u, v

    def inside(self, x, y, z):
        rho, u, v = self.radial(x, y, z)
        outline = 1.0 + self.irr(v[0] / rho, v[1] / rho, v[2] / rho)
        return rho <= outline, rho, outline, u, v


class _Node(_Prim):
    def __init__(self, shape: _NodeShape, tissue: int, base_hu: float, texture_field, texture_hu: float, necrosis_hu: float, rim_hu: float):
        self.shape, self.tissue = shape, tissue
        self.base_hu, self.field, self.texture_hu = base_hu, texture_field, texture_hu
        self.necrosis_hu, self.rim_hu = necrosis_hu, rim_hu
        r = shape.bounding_radius + 0.5
        self.lo, self.hi = shape.c - r, shape.c + r

    def paint(self, x, y, z, m):
        s = self.shape
        inside, rho, outline, u, v = s.inside(x, y, z)
        _put(m, self.tissue, inside, _OVER_FAT)
        if s.necrosis is not None:
            scale, harmonics = s.necrosis
            vn = [u[a] / np.float32(s.semi[a] * scale[a]) for a in range(3)]
            rn = np.sqrt(vn[0] ** 2 + vn[1] ** 2 + vn[2] ** 2) + np.float32(1e-6)
            core = rn <= 1.0 + harmonics(vn[0] / rn, vn[1] / rn, vn[2] / rn)
            np.copyto(m, np.uint8(_T.NODE_NECROSIS), where=core & (m == self.tissue))
        if s.hilum is not None:
            offset, semi = s.hilum
            q = sum(((u[a] - np.float32(offset[a])) / np.float32(semi[a])) ** 2 for a in range(3))
            np.copyto(m, np.uint8(_T.NODE_HILUM_FAT), where=(q <= 1.0) & (m == self.tissue))

    def texture(self, x, y, z, m, hu):
        mine = m == self.tissue
        necrotic = m == _T.NODE_NECROSIS
        if not (mine.any() or necrotic.any()):
            return
        value = np.broadcast_to(self.field(x, y, z), m.shape)
        if mine.any():
            extra = np.float32(self.base_hu) + value * np.float32(self.texture_hu)
            if self.rim_hu:
                rho = np.broadcast_to(self.shape.radial(x, y, z)[0], m.shape)
                extra = extra + np.float32(self.rim_hu) * np.clip((rho - 0.45) / 0.4, 0.0, 1.0)
            hu[mine] = extra[mine]
        if necrotic.any():
            hu[necrotic] = (np.float32(self.necrosis_hu) + value * np.float32(4.0))[necrotic]


def _paint(prims: Sequence[_Prim], target) -> None:
    for prim in prims:
        block = target.block(prim.lo, prim.hi)
        if block is None:
            continue
        key, x, y, z = block
        m = target.mat[key]
        prim.paint(x, y, z, m)
        if not target.is_view:
            target.mat[key] = m


def _texture(prims: Sequence[_Prim], target) -> None:
    for prim in prims:
        if type(prim).texture is _Prim.texture:
            continue
        block = target.block(prim.lo, prim.hi)
        if block is None:
            continue
        key, x, y, z = block
        hu = target.hu[key]
        prim.texture(x, y, z, target.mat[key], hu)
        if not target.is_view:
            target.hu[key] = hu


# ------------------------------------------------------------------------------------------------
# patient anatomy


@dataclass
class _Patient:
    anatomy: dict
    raster: _CrossSection
    bowel: list  # loops: dict(points (n,3), radius, wall, kind, collapsed)
    nodes: list  # dict(shape=_NodeShape, metastatic, station, ...)
    band: tuple[float, float]
    body_box: tuple[np.ndarray, np.ndarray]  # in-plane box (x, y) incl. table
    oral_contrast: bool
    mesenteric: list  # capsules (a, b, r, tissue)


def _body_profile(anat: dict, theta: np.ndarray) -> dict:
    """Radii (mm) of the body layers along directions theta (atan2(y, x), patient frame)."""
    b = anat["body"]
    s, c = np.sin(theta), np.cos(theta)
    posterior = s > 0
    bb = np.where(posterior, b["b_post"], b["b_ant"])
    pp = np.where(posterior, b["p_post"], b["p_ant"])
    r_body = 1.0 / (np.abs(c / b["a"]) ** pp + np.abs(s / bb) ** pp) ** (1.0 / pp)
    for k, amp, phase in b["harm"]:
        r_body = r_body * (1.0 + amp * np.cos(k * theta + phase))
    t_sc = anat["t_sc"] * (1.0 - 0.5 * np.clip(s, 0.0, None)) * (1.0 + 0.12 * np.cos(2 * theta + anat["t_sc_phase"]))
    # the lateral wall muscles end at the back muscles (thoracolumbar fascia): taper them off posteriorly
    from_back = np.abs(np.angle(np.exp(1j * (theta - math.pi / 2))))
    t_m = anat["t_m"] * (0.8 + 0.4 * c * c) * np.clip((from_back - 0.55) / 0.4, 0.0, 1.0)
    return {"body": r_body, "skin": anat["skin"], "t_sc": t_sc, "t_m": t_m}


def _cavity_radius(anat: dict, theta: float) -> float:
    prof = _body_profile(anat, np.array([theta]))
    return float(prof["body"][0] - prof["skin"] - prof["t_sc"][0] - prof["t_m"][0])


def _make_cross_section(anat: dict, res: float = 0.4) -> tuple[_CrossSection, tuple[np.ndarray, np.ndarray]]:
    b = anat["body"]
    outline_angles = np.linspace(-math.pi, math.pi, 721)
    outline_r = _body_profile(anat, outline_angles)["body"]
    x_half = float(np.abs(outline_r * np.cos(outline_angles)).max()) + 1.0
    y_lo = float((outline_r * np.sin(outline_angles)).min()) - 1.0
    y_hi = float((outline_r * np.sin(outline_angles)).max()) + 1.0
    xs = np.arange(-x_half, x_half + res, res, dtype=np.float32)
    ys = np.arange(y_lo, y_hi + res, res, dtype=np.float32)
    X, Y = np.meshgrid(xs, ys)
    r = np.hypot(X, Y)
    theta = np.arctan2(Y, X)
    # profiles on a table of angles, then looked up
    angles = np.linspace(-math.pi, math.pi, 2049)
    prof = _body_profile(anat, angles)
    idx = np.clip(np.rint((theta + math.pi) / (2 * math.pi) * 2048).astype(np.int32), 0, 2048)
    r_body = prof["body"][idx]
    d = r_body - r
    t_sc = prof["t_sc"][idx]
    t_m = prof["t_m"][idx]
    anterior_mid = (Y < 0) & (np.abs(X) < anat["linea_alba"] / 2.0)
    t_m = np.where(anterior_mid, 2.0, t_m)
    raster = np.full(X.shape, _T.AIR, dtype=np.uint8)
    raster[d >= 0] = _T.SKIN
    raster[d >= anat["skin"]] = _T.SUBCUTANEOUS_FAT
    raster[d >= anat["skin"] + t_sc] = _T.MUSCLE
    raster[d >= anat["skin"] + t_sc + t_m] = _T.VISCERAL_FAT
    for (cx, cy, ax, ay, power) in anat["back_muscles"]:
        rows = slice(max(int((cy - ay - ys[0]) / res) - 1, 0), int((cy + ay - ys[0]) / res) + 2)
        cols = slice(max(int((cx - ax - xs[0]) / res) - 1, 0), int((cx + ax - xs[0]) / res) + 2)
        q = np.abs((X[rows, cols] - cx) / ax) ** power + np.abs((Y[rows, cols] - cy) / ay) ** power
        window = raster[rows, cols]
        window[(q <= 1.0) & (d[rows, cols] > anat["skin"] + 1.0)] = _T.PARASPINAL
    section = _CrossSection(raster, float(xs[0]), float(ys[0]), res)
    box = (np.array([-x_half, y_lo]), np.array([x_half, anat["table_y"] + anat["table_t"] + 3.0]))
    return section, box


def _sample_anatomy(rng: np.random.Generator, band: tuple[float, float]) -> dict:
    t_sc = _u(rng, (6.0, 35.0))  # habitus: subcutaneous fat thickness drives the body size
    body = {
        "a": _u(rng, (114, 134)) + 0.8 * t_sc,
        "b_ant": _u(rng, (74, 92)) + 0.9 * t_sc,
        "b_post": _u(rng, (70, 86)) + 0.5 * t_sc,
        "p_ant": _u(rng, (2.0, 2.5)),
        "p_post": _u(rng, (2.7, 3.6)),
        "harm": [(k, _u(rng, (0.0, 0.015)), _u(rng, (0, 2 * math.pi))) for k in (2, 3, 4)],
    }
    anat: dict[str, Any] = {"body": body}
    anat["skin"] = _u(rng, (1.5, 2.5))
    anat["t_sc"] = t_sc
    anat["t_sc_phase"] = _u(rng, (0, 2 * math.pi))
    anat["t_m"] = _u(rng, (7, 13))
    anat["linea_alba"] = _u(rng, (6, 18))
    anat["table_y"] = body["b_post"] + _u(rng, (0.5, 3.0))
    anat["table_t"] = _u(rng, (4, 7))
    # spine and back muscles, from the back surface inwards
    t_sc_post = anat["t_sc"] * 0.5
    y_in = body["b_post"] - anat["skin"] - t_sc_post - 2.0
    ps_a, ps_b = _u(rng, (20, 27)), _u(rng, (16, 22))
    y_ps = y_in - ps_b
    ca, cb = _u(rng, (9, 12)), _u(rng, (7, 9))
    av, bv = _u(rng, (21, 27)), _u(rng, (15, 19))
    y_c = y_ps - 0.35 * ps_b
    y_v = y_c - cb - _u(rng, (2.0, 4.0)) - bv
    x_ps = ps_a + _u(rng, (3.0, 6.0))
    psoas_a0, psoas_b0 = _u(rng, (9, 14)), _u(rng, (8, 12))
    psoas_grow = _u(rng, (0.04, 0.09))
    ql = (_u(rng, (13, 19)), _u(rng, (7, 11)))
    ql_x = av + 2 * psoas_a0 + _u(rng, (6, 14)) + ql[0] * 0.5
    ql_y = y_v + bv * 0.6 + _u(rng, (0, 6))
    ps_power = _u(rng, (2.3, 3.0))
    anat["back_muscles"] = [
        (x_ps, y_ps, ps_a, ps_b, ps_power),
        (-x_ps, y_ps, ps_a, ps_b, ps_power),
        (ql_x, ql_y, ql[0], ql[1], 2.0),
        (-ql_x, ql_y, ql[0], ql[1], 2.0),
    ]
    arch = _u(rng, (4.5, 6.5))
    anat["vertebra"] = {
        "av": av, "bv": bv, "yv": y_v, "cort": _u(rng, (1.5, 2.5)),
        "period": _u(rng, (32, 38)), "disc": _u(rng, (7, 11)), "phase": _u(rng, (0, 40)),
        "ca": ca, "cb": cb, "yc": y_c, "arch": arch,
        "sp_a": _u(rng, (2.5, 4.0)), "sp_b": _u(rng, (10, 14)),
        "tp_a": _u(rng, (11, 16)), "tp_b": _u(rng, (2.8, 4.2)), "tp_half": _u(rng, (4, 7)),
        "tp_angle": math.radians(_u(rng, (8, 22))),
    }
    v = anat["vertebra"]
    v["sp_y"] = y_c + cb + arch + v["sp_b"] - 3.0
    overshoot = v["sp_y"] + v["sp_b"] - (y_in - 4.0)
    if overshoot > 0:  # the spinous process stays under the skin
        v["sp_b"] -= overshoot / 2.0
        v["sp_y"] -= overshoot / 2.0
    v["tp_x"] = ca + arch + v["tp_a"] * math.cos(v["tp_angle"]) - 2.0
    v["tp_y"] = y_c - cb * 0.5 + v["tp_a"] * math.sin(v["tp_angle"])
    anat["psoas"] = {"a0": psoas_a0, "b0": psoas_b0, "grow": psoas_grow, "y": y_v + _u(rng, (-3, 5)), "gap": _u(rng, (0.5, 3))}
    # great vessels
    r_a = _u(rng, (8, 12))
    aorta = {"x": _u(rng, (4, 15)), "y": y_v - bv - r_a - _u(rng, (1.5, 4)), "r": r_a, "slope_x": _u(rng, (-0.03, 0.03)), "wall": 1.5}
    aorta["plaques"] = []
    if rng.random() < 0.45:
        for _ in range(int(rng.integers(1, 5))):
            aorta["plaques"].append((_u(rng, (0, 2 * math.pi)), _u(rng, (band[0] - 40, band[1] + 40)), _u(rng, (0.8, 2.2))))
    anat["aorta"] = aorta
    ivc_a, ivc_b = _u(rng, (11, 16)), _u(rng, (6, 10))
    anat["ivc"] = {"x": aorta["x"] - r_a - ivc_a - _u(rng, (5, 13)), "y": y_v - bv - ivc_b - _u(rng, (1, 6)), "a": ivc_a, "b": ivc_b}
    # SMA / SMV run from above the band downwards and forwards
    z_top, z_bot = band[1] + 80.0, band[0] - 80.0
    sma_r = _u(rng, (3.0, 4.5))
    sma_top = np.array([aorta["x"] + _u(rng, (-4, 2)), aorta["y"] - r_a - _u(rng, (10, 18)), z_top])
    sma_bot = sma_top + np.array([_u(rng, (-15, 5)), -_u(rng, (10, 30)), z_bot - z_top])
    smv_r = _u(rng, (5, 7))
    smv_top = sma_top + np.array([-_u(rng, (9, 15)), _u(rng, (-3, 4)), 0.0])
    smv_bot = sma_bot + np.array([-_u(rng, (9, 18)), _u(rng, (-3, 6)), 0.0])
    anat["sma"] = (sma_top, sma_bot, sma_r)
    anat["smv"] = (smv_top, smv_bot, smv_r)
    # kidneys (left kidney higher)
    z_kr = _u(rng, (band[1] - 20, band[1] + 25))
    kidneys = []
    for side, z_k in ((-1, z_kr), (1, z_kr + _u(rng, (5, 20)))):
        tr, ap, cc = _u(rng, (22, 28)), _u(rng, (17, 22)), _u(rng, (45, 58))
        alpha = math.radians(_u(rng, (25, 45)))
        hilum_dir = np.array([-side * math.cos(alpha), -math.sin(alpha), 0.0])  # medial and anterior
        e1 = -hilum_dir
        e3 = _rot_y(side * math.radians(_u(rng, (6, 16)))) @ np.array([0.0, 0.0, 1.0])
        e1 = _unit(e1 - (e1 @ e3) * e3)
        e2 = np.cross(e3, e1)
        # on the quadratus lumborum, lateral to the psoas
        centre = np.array([side * (ql_x + _u(rng, (-4, 8))), ql_y - ql[1] - ap * _u(rng, (0.7, 0.9)), z_k])
        pyramids = []
        for _ in range(int(rng.integers(7, 11))):
            d = rng.standard_normal(3) * np.array([0.5, 0.7, 1.0])
            d[0] = abs(d[0]) + 0.15  # towards the lateral convexity, away from the hilum
            pyramids.append(_unit(d))
        kidneys.append({"side": side, "c": centre, "axes": np.stack([e1, e2, e3], axis=1), "semi": np.array([tr, ap, cc]),
                        "cortex": _u(rng, (5, 8)), "hilum_dir": hilum_dir, "pyramids": np.array(pyramids)})
    anat["kidneys"] = kidneys
    # liver, gallbladder, spleen: only their lower parts reach the band
    liver_semi = np.array([_u(rng, (70, 95)), _u(rng, (60, 85)), _u(rng, (90, 120))])
    liver_c = np.array([-_u(rng, (55, 80)), y_v - bv - _u(rng, (5, 35)), band[1] + _u(rng, (-15, 40)) + liver_semi[2]])
    anat["liver"] = (liver_c, _rot_z(math.radians(_u(rng, (-15, 15)))), liver_semi)
    anat["gallbladder"] = None
    if rng.random() < 0.5:
        gb_semi = np.array([_u(rng, (12, 18)), _u(rng, (12, 18)), _u(rng, (28, 42))])
        gb_c = liver_c + np.array([_u(rng, (10, 40)), -liver_semi[1] * 0.55, -liver_semi[2] * 0.85])
        anat["gallbladder"] = (gb_c, _rot_x(math.radians(_u(rng, (-25, 10)))), gb_semi)
    spleen_semi = np.array([_u(rng, (28, 38)), _u(rng, (40, 55)), _u(rng, (45, 60))])
    spleen_c = np.array([_u(rng, (70, 90)), y_v + _u(rng, (-15, 10)), band[1] + _u(rng, (-10, 50)) + spleen_semi[2]])
    anat["spleen"] = (spleen_c, _rot_z(math.radians(_u(rng, (20, 40)))), spleen_semi)
    return anat


def _anatomy_prims(anat: dict) -> list[_Prim]:
    """Static anatomy after the cross-section: spine, muscles, vessels, organs (no bowel, no nodes)."""
    prims: list[_Prim] = [_Vertebra(anat["vertebra"])]
    v, ps = anat["vertebra"], anat["psoas"]
    for side in (-1, 1):
        # psoas grows inferiorly (z < 0); its centre moves laterally with it
        prims.append(
            _Cylinder(
                (side * (v["av"] + ps["gap"] + ps["a0"]), ps["y"]),
                (ps["a0"], ps["b0"]),
                [(_T.PSOAS, 0.0, _OVER_FAT)],
                slope_xy=(-side * ps["grow"], 0.0),
                grow_xy=(-ps["grow"], -0.6 * ps["grow"]),
                z_range=(-300.0, 60.0),
            )
        )
    ao = anat["aorta"]
    prims.append(
        _Cylinder((ao["x"], ao["y"]), (ao["r"], ao["r"]), [(_T.VESSEL_WALL, 0.0, _OVER_FAT), (_T.AORTA, ao["wall"], None)], slope_xy=(ao["slope_x"], 0.0))
    )
    for angle, z_p, r_p in ao["plaques"]:
        centre = np.array([ao["x"] + ao["slope_x"] * z_p + ao["r"] * math.cos(angle), ao["y"] + ao["r"] * math.sin(angle), z_p])
        prims.append(_Ellipsoid(centre, np.eye(3), (r_p, r_p, r_p * 1.8), [(_T.CALCIFICATION, 0.0, _lut(_T.VESSEL_WALL, _T.AORTA, _T.VISCERAL_FAT))]))
    iv = anat["ivc"]
    prims.append(_Cylinder((iv["x"], iv["y"]), (iv["a"], iv["b"]), [(_T.IVC, 0.0, _OVER_FAT)]))
    # kidneys and their vessels
    for kid in anat["kidneys"]:
        c, axes, semi = kid["c"], kid["axes"], kid["semi"]
        prims.append(_Kidney(c, axes, semi, kid["cortex"], kid["pyramids"]))
        sinus_c = c - axes[:, 0] * semi[0] * 0.55
        prims.append(_Ellipsoid(sinus_c, axes, semi * np.array([0.45, 0.42, 0.5]), [(_T.RENAL_SINUS_FAT, 0.0, _lut(_T.KIDNEY_CORTEX, _T.KIDNEY_MEDULLA))]))
        pelvis_c = c - axes[:, 0] * semi[0] * 0.75
        prims.append(_Ellipsoid(pelvis_c, axes, semi * np.array([0.3, 0.22, 0.2]), [(_T.URINE, 0.0, _lut(_T.RENAL_SINUS_FAT, _T.VISCERAL_FAT))]))
        hilum = c - axes[:, 0] * semi[0] * 0.95
        z_h = hilum[2]
        aorta_side = np.array([ao["x"] + ao["slope_x"] * z_h + kid["side"] * ao["r"] * 0.7, ao["y"], z_h + 6.0])
        prims.append(_Capsule(aorta_side, hilum + np.array([0, 2.0, 3.0]), 3.0, [(_T.ARTERY, 0.0, _OVER_FAT)]))
        if kid["side"] < 0:
            prims.append(_Capsule(hilum, np.array([iv["x"], iv["y"], z_h - 2.0]), 4.5, [(_T.VEIN, 0.0, _OVER_FAT)]))
        else:
            sma_top, sma_bot, _ = anat["sma"]
            t = (z_h - sma_top[2]) / (sma_bot[2] - sma_top[2])
            sma_at = sma_top + t * (sma_bot - sma_top)
            between = np.array([ao["x"] + ao["slope_x"] * z_h, (ao["y"] - ao["r"] + sma_at[1]) / 2.0, z_h - 4.0])
            prims.append(_Capsule(hilum, between + np.array([15.0, 0.0, 0.0]), 4.5, [(_T.VEIN, 0.0, _OVER_FAT)]))
            prims.append(_Capsule(between + np.array([15.0, 0.0, 0.0]), between, 4.5, [(_T.VEIN, 0.0, _OVER_FAT)]))
            prims.append(_Capsule(between, np.array([iv["x"], iv["y"], z_h - 8.0]), 4.5, [(_T.VEIN, 0.0, _OVER_FAT)]))
    # solid organs (only over fat: they never overwrite what is already there)
    for key, tissue in (("liver", _T.LIVER), ("spleen", _T.SPLEEN)):
        c, rot, semi = anat[key]
        prims.append(_Ellipsoid(c, rot, semi, [(tissue, 0.0, _OVER_FAT)]))
    if anat["gallbladder"] is not None:
        c, rot, semi = anat["gallbladder"]
        prims.append(_Ellipsoid(c, rot, semi, [(_T.GALLBLADDER, 0.0, _lut(_T.VISCERAL_FAT, _T.LIVER))]))
    # superior mesenteric vessels
    for (top, bot, r), tissue in ((anat["sma"], _T.ARTERY), (anat["smv"], _T.VEIN)):
        prims.append(_Capsule(top, bot, r, [(tissue, 0.0, _OVER_FAT)]))
    return prims


class _Scene:
    """The cross-section plus a growing list of primitives, queried at points (placement checks)."""

    def __init__(self, cross: _CrossSection, prims: Sequence[_Prim] = ()):
        self.cross = cross
        self.prims: list[_Prim] = []
        self.lo = np.zeros((0, 3))
        self.hi = np.zeros((0, 3))
        self.extend(prims)

    def extend(self, prims: Sequence[_Prim]) -> None:
        prims = list(prims)
        if not prims:
            return
        self.prims.extend(prims)
        self.lo = np.concatenate([self.lo, np.array([p.lo for p in prims])])
        self.hi = np.concatenate([self.hi, np.array([p.hi for p in prims])])

    def tissues_at(self, points: np.ndarray) -> np.ndarray:
        target = _PointTarget(points)
        lo = target.points.min(axis=0)
        hi = target.points.max(axis=0)
        _paint([self.cross], target)
        hits = np.nonzero(np.all(self.lo <= hi, axis=1) & np.all(self.hi >= lo, axis=1))[0]
        _paint([self.prims[i] for i in hits], target)
        return target.mat

    def all_fat(self, points: np.ndarray) -> bool:
        return bool(np.all(self.tissues_at(points) == _T.VISCERAL_FAT))


_RING = np.stack([np.cos(np.linspace(0, 2 * math.pi, 10, endpoint=False)), np.sin(np.linspace(0, 2 * math.pi, 10, endpoint=False))], axis=1)


def _tube_points(points: np.ndarray, radius: float, step: float = 7.0) -> np.ndarray:
    """Points on the surface of a polyline tube (rings every `step` mm plus the end caps)."""
    out = []
    for a, b in zip(points[:-1], points[1:]):
        axis = b - a
        length = float(np.linalg.norm(axis))
        axis = axis / max(length, 1e-9)
        helper = np.array([1.0, 0.0, 0.0]) if abs(axis[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
        e1 = np.array([axis[1] * helper[2] - axis[2] * helper[1], axis[2] * helper[0] - axis[0] * helper[2], axis[0] * helper[1] - axis[1] * helper[0]])
        e1 /= math.sqrt(float(e1 @ e1))
        e2 = np.array([axis[1] * e1[2] - axis[2] * e1[1], axis[2] * e1[0] - axis[0] * e1[2], axis[0] * e1[1] - axis[1] * e1[0]])
        ring = radius * (_RING[:, :1] * e1 + _RING[:, 1:] * e2)
        ts = np.linspace(0.0, 1.0, max(int(length / step), 1) + 1)
        centres = a + ts[:, None] * (b - a)
        out.append((centres[:, None, :] + ring[None, :, :]).reshape(-1, 3))
        out.append(np.stack([a - radius * axis, b + radius * axis]))
    return np.concatenate(out)


def _bowel_prims(loops: list, contents: list | None = None) -> list[_Prim]:
    """Walls first, then lumens; `contents[i]` = (tissue, level_y, gas, field, texture_hu) per loop."""
    prims: list[_Prim] = []
    for loop in loops:
        pts = loop["points"]
        for a, b in zip(pts[:-1], pts[1:]):
            prims.append(_Capsule(a, b, loop["radius"], [(_T.BOWEL_WALL, 0.0, _OVER_FAT_WALL)]))
        for a, b in zip(pts[:-1], pts[1:]):
            if contents is None:
                prims.append(_BowelLumen(a, b, loop["radius"] - loop["wall"], _T.BOWEL_FLUID, 0.0, False))
            else:
                tissue, level, gas, fld, tex = contents[loop["index"]]
                prims.append(_BowelLumen(a, b, loop["radius"] - loop["wall"], tissue, level, gas, fld, tex))
    return prims


def _sample_bowel(rng: np.random.Generator, anat: dict, band: tuple[float, float], cross: _CrossSection, static: list[_Prim]) -> list:
    """Colon on both sides (and often the transverse colon), small-bowel loops in front; no overlaps."""
    loops: list[dict] = []
    scene = _Scene(cross, static)
    ao = anat["aorta"]
    x_cav_r = _cavity_radius(anat, math.pi)
    x_cav_l = _cavity_radius(anat, 0.0)
    y_cav_ant = -_cavity_radius(anat, -math.pi / 2)
    liver_tip = anat["liver"][0][2] - anat["liver"][2][2]
    spleen_tip = anat["spleen"][0][2] - anat["spleen"][2][2]

    def try_add(points, radius, wall, kind):
        pts = np.asarray(points, dtype=float)
        if not scene.all_fat(pts) or not scene.all_fat(_tube_points(pts, radius + 2.0)):
            return False
        loop = {"points": pts, "radius": radius, "wall": wall, "kind": kind, "index": len(loops)}
        loops.append(loop)
        scene.extend(_bowel_prims([loop]))
        return True

    def wiggly_vertical(x, y, z0, z1, n=4):
        return [(x - np.sign(x) * _u(rng, (0, 6)), y + _u(rng, (-5, 5)), z) for z in np.linspace(z0, z1, n)]

    def cavity_edge_x(y: float, side: int) -> float:
        row = cross.raster[int(np.clip(round((y - cross.y0) / cross.res), 0, cross.raster.shape[0] - 1))]
        fat = np.nonzero(row == _T.VISCERAL_FAT)[0]
        if fat.size == 0:
            return 0.0
        return cross.x0 + cross.res * (fat.max() if side > 0 else fat.min())

    # ascending (patient right) and descending (left) colon, in front of the kidneys, below liver / spleen
    for side, tip, radius_range in ((-1, liver_tip, (14, 22)), (1, spleen_tip, (9, 15))):
        kidney = anat["kidneys"][0 if side < 0 else 1]
        for _ in range(20):
            r = _u(rng, radius_range)
            y = _u(rng, (y_cav_ant + r + 25, kidney["c"][1] - kidney["semi"][1] - r - 3))
            x = cavity_edge_x(y, side) - side * (r + _u(rng, (4, 12)))
            z_top = min(band[1] + 60.0, tip - r - 3.0)
            z_bot = band[0] - 60.0
            if z_top - z_bot < 40.0:
                break
            if try_add(wiggly_vertical(x, y, z_bot, z_top), r, _u(rng, (2, 3)), "colon"):
                break
    if rng.random() < 0.6:  # transverse colon hanging down in front
        for _ in range(15):
            r = _u(rng, (12, 19))
            y = y_cav_ant + r + _u(rng, (3, 10))
            z = band[1] + _u(rng, (-5, 30))
            pts = [(x, y + _u(rng, (-4, 6)), z - 12.0 * math.cos(x / 90.0 * math.pi / 2) + _u(rng, (-4, 4))) for x in np.linspace(-80, 80, 5)]
            if try_add(pts, r, _u(rng, (2, 3)), "colon"):
                break
    # small-bowel loops: random walks kept in front of the great vessels, left or right of the
    # mesenteric root (SMA / SMV), below the liver on the right
    sma_x = min(anat["sma"][0][0], anat["sma"][1][0]) - anat["sma"][2]
    sma_x_left = max(anat["sma"][0][0], anat["sma"][1][0]) + anat["sma"][2]
    smv_x = min(anat["smv"][0][0], anat["smv"][1][0]) - anat["smv"][2]
    n_loops = int(rng.integers(6, 13))
    for _ in range(n_loops):
        for _attempt in range(15):
            collapsed = rng.random() < 0.25
            r = _u(rng, (5.5, 8.0)) if collapsed else _u(rng, (8, 13))
            wall = r - _u(rng, (1.0, 2.0)) if collapsed else _u(rng, (2, 3))
            if rng.random() < 0.55:  # left (jejunum)
                lo = np.array([sma_x_left + r + 10, y_cav_ant + r + 8, band[0] - 50])
                hi = np.array([x_cav_l - r - 25, ao["y"] - ao["r"] - r - 4, band[1] + 50])
            else:  # right (ileum), under the liver
                lo = np.array([-x_cav_r + r + 25, y_cav_ant + r + 8, band[0] - 50])
                hi = np.array([min(smv_x, sma_x) - r - 10, ao["y"] - ao["r"] - r - 4, min(band[1] + 50, liver_tip - r - 8)])
            if np.any(hi <= lo):
                continue
            pts = [lo + (hi - lo) * rng.random(3)]
            direction = _random_unit(rng)
            for _seg in range(int(rng.integers(2, 6))):
                turns = rng.standard_normal((8, 3))
                turns /= np.linalg.norm(turns, axis=1, keepdims=True)
                candidates = direction + turns * np.array([1.0, 1.0, 0.6])
                candidates /= np.linalg.norm(candidates, axis=1, keepdims=True)
                steps = pts[-1] + candidates * rng.uniform(15, 32, (8, 1))
                valid = np.nonzero(np.all((steps >= lo) & (steps <= hi), axis=1))[0]
                if valid.size:
                    direction = candidates[valid[0]]
                    pts.append(steps[valid[0]])
            if len(pts) >= 2 and try_add(pts, r, wall, "collapsed" if collapsed else "small"):
                break
    return loops


def _sample_mesenteric_branches(rng: np.random.Generator, anat: dict, band: tuple[float, float]) -> list:
    branches = []
    for _ in range(int(rng.integers(6, 13))):
        top, bot, r_parent = anat["sma"] if rng.random() < 0.5 else anat["smv"]
        tissue = _T.ARTERY if r_parent == anat["sma"][2] else _T.VEIN
        z = _u(rng, (band[0] - 30, band[1] + 30))
        t = (z - top[2]) / (bot[2] - top[2])
        start = top + t * (bot - top)
        direction = _unit(np.array([_u(rng, (-1, 1)), -_u(rng, (0.3, 1.0)), -_u(rng, (0.0, 0.8))]))
        length = _u(rng, (30, 80))
        mid = start + direction * length * 0.5
        end = mid + _unit(direction + 0.5 * _random_unit(rng)) * length * 0.5
        radius = _u(rng, (1.2, 2.6))
        branches.append((start, mid, radius, tissue))
        branches.append((mid, end, radius * 0.8, tissue))
    return branches


def _branch_prims(branches: list) -> list[_Prim]:
    return [_Capsule(a, b, r, [(tissue, 0.0, _OVER_FAT)]) for a, b, r, tissue in branches]


# ------------------------------------------------------------------------------------------------
# nodes


def _truncated_lognormal(rng: np.random.Generator, median: float, sigma: float, bounds: tuple[float, float]) -> float:
    for _ in range(1000):
        value = median * math.exp(sigma * float(rng.standard_normal()))
        if bounds[0] <= value <= bounds[1]:
            return value
    return float(np.clip(median, *bounds))


def _axial_axes(axes: np.ndarray, semi: np.ndarray) -> tuple[float, float]:
    """(long, short) diameters of the central axial section of an ellipsoid (its largest one)."""
    q = axes @ np.diag(1.0 / semi**2) @ axes.T
    eig = np.linalg.eigvalsh(q[:2, :2])
    return 2.0 / math.sqrt(eig[0]), 2.0 / math.sqrt(eig[1])


def _sample_node_shape(rng: np.random.Generator, cfg: PhantomConfig, metastatic: bool, station: str) -> dict:
    if metastatic:
        short = _truncated_lognormal(rng, cfg.metastatic_short_axis_median_mm, cfg.metastatic_short_axis_log_sigma, cfg.short_axis_range_mm)
        ratio = _u(rng, cfg.metastatic_long_short_ratio)
        middle = _u(rng, (1.0, ratio))
        irregular = _u(rng, cfg.metastatic_irregularity)
    else:
        short = _truncated_lognormal(rng, cfg.benign_short_axis_median_mm, cfg.benign_short_axis_log_sigma, cfg.short_axis_range_mm)
        ratio = _u(rng, cfg.benign_long_short_ratio)
        middle = _u(rng, (1.0, 1.3))
        irregular = _u(rng, cfg.benign_irregularity)
    semi = np.array([ratio, middle, 1.0])
    # long axis: retroperitoneal nodes often run along the vessels (cranio-caudal)
    if station != "mesenteric" and rng.random() < 0.4:
        elevation = math.radians(_u(rng, (50, 90)))
    else:
        elevation = math.radians(_u(rng, (0, 35)))
    azimuth = _u(rng, (0, 2 * math.pi))
    e1 = np.array([math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth), math.sin(elevation)])
    helper = _random_unit(rng)
    e2 = _unit(helper - (helper @ e1) * e1)
    e3 = np.cross(e1, e2)
    axes = np.stack([e1, e2, e3], axis=1)
    _, short_now = _axial_axes(axes, semi)
    semi = semi * (short / short_now)
    long_axial, short_axial = _axial_axes(axes, semi)
    node = {
        "metastatic": bool(metastatic),
        "station": station,
        "axes": axes,
        "semi": semi,
        "short_axis_mm": short_axial,
        "long_axis_mm": long_axial,
        "irregularity": irregular,
        "irr": _Harmonics(rng, irregular),
        "necrosis": None,
        "hilum": None,
        "field": _CosField(rng, 5, (2.5, 7.0)),
    }
    if metastatic:
        node["base_hu"] = _u(rng, cfg.metastatic_hu)
        node["texture_hu"] = _u(rng, cfg.metastatic_texture_hu)
        if rng.random() < cfg.necrosis_probability:
            scale = np.full(3, _u(rng, cfg.necrosis_scale)) * rng.uniform(0.85, 1.15, 3)
            node["necrosis"] = (scale, _Harmonics(rng, _u(rng, (0.05, 0.15))))
            node["necrosis_hu"] = _u(rng, cfg.necrosis_hu)
            node["rim_hu"] = _u(rng, (5, 20))
    else:
        node["base_hu"] = _u(rng, cfg.benign_hu)
        node["texture_hu"] = _u(rng, (1.0, 3.0))
        if rng.random() < cfg.fatty_hilum_probability:
            side = 1.0 if rng.random() < 0.5 else -1.0
            offset = np.array([0.0, side * semi[1] * _u(rng, (0.55, 0.8)), 0.0])
            hsemi = semi * np.array([_u(rng, (0.3, 0.45)), _u(rng, (0.45, 0.6)), _u(rng, (0.35, 0.55))])
            node["hilum"] = (offset, hsemi)
    node.setdefault("necrosis_hu", 0.0)
    node.setdefault("rim_hu", 0.0)
    return node


def _propose_centre(rng: np.random.Generator, anat: dict, station: str, radius: float, z: float, branches: list) -> np.ndarray:
    ao, iv = anat["aorta"], anat["ivc"]
    ax = ao["x"] + ao["slope_x"] * z
    gap = _u(rng, (2.0, 9.0))
    if station == "para-aortic":
        angle = math.radians(_u(rng, (-75, 60)))
        d = ao["r"] + radius + gap
        return np.array([ax + d * math.cos(angle), ao["y"] + d * math.sin(angle), z])
    if station == "pre-aortic":
        angle = math.radians(_u(rng, (-130, -50)))
        d = ao["r"] + radius + gap
        return np.array([ax + d * math.cos(angle), ao["y"] + d * math.sin(angle), z])
    if station == "aortocaval":
        x = _u(rng, (iv["x"] + iv["a"] * 0.5, ax - ao["r"] * 0.5))
        return np.array([x, _u(rng, (ao["y"] - ao["r"] - radius, ao["y"] + ao["r"])), z])
    if station == "paracaval":
        angle = math.radians(_u(rng, (100, 260)))
        d = max(iv["a"], iv["b"]) + radius + gap
        return np.array([iv["x"] + d * math.cos(angle) * 1.0, iv["y"] + d * math.sin(angle) * 0.8, z])
    if station == "retrocaval":
        return np.array([iv["x"] + _u(rng, (-8, 8)), iv["y"] + iv["b"] + radius + _u(rng, (1.5, 5)), z])
    # mesenteric: next to a mesenteric vessel or loose in the mesentery
    near = [branch for branch in branches if abs(branch[1][2] - branch[0][2]) > 1e-6 and min(branch[0][2], branch[1][2]) <= z <= max(branch[0][2], branch[1][2])]
    if near and rng.random() < 0.6:
        a, b, r, _ = near[int(rng.integers(len(near)))]
        point = a + (z - a[2]) / (b[2] - a[2]) * (b - a)  # where the branch crosses the node's level
        offset = _unit(rng.standard_normal(3) * np.array([1.0, 1.0, 0.3]))
        return point + offset * (r + radius + gap)
    y_ant = -_cavity_radius(anat, -math.pi / 2)
    return np.array([_u(rng, (-80, 80)), _u(rng, (y_ant + 15, ao["y"] - ao["r"] - 5)), z])


_RETRO_STATIONS = ("para-aortic", "para-aortic", "aortocaval", "pre-aortic", "paracaval", "retrocaval")


def _place_nodes(rng: np.random.Generator, cfg: PhantomConfig, anat: dict, scene: _Scene,
                 branches: list, band: tuple[float, float], classes: list[bool]) -> list[dict]:
    placed: list[dict] = []
    grow = cfg.node_size_change[1]
    minimum = min(cfg.nodes_per_case[0], len(classes))
    for position, metastatic in enumerate(classes):
        # a node that finds no room is dropped, unless the case would end below the minimum count
        attempts = 60 if len(placed) + (len(classes) - position) > minimum else 400
        station = (
            _RETRO_STATIONS[int(rng.integers(len(_RETRO_STATIONS)))]
            if rng.random() < cfg.retroperitoneal_probability
            else "mesenteric"
        )
        node = _sample_node_shape(rng, cfg, metastatic, station)
        shape_r = float(node["semi"].max()) * (1.0 + node["irr"].max) * grow
        for _attempt in range(attempts):
            if _attempt == 30:  # that station is crowded: try the mesentery
                node["station"] = station = "mesenteric"
            z = _u(rng, band)
            centre = _propose_centre(rng, anat, station, shape_r, z, branches)
            if not band[0] - 3.0 <= centre[2] <= band[1] + 3.0:
                continue
            if any(np.linalg.norm(centre - other["centre"]) < shape_r + other["bound"] + cfg.node_gap_mm for other in placed):
                continue
            axes, semi = node["axes"], node["semi"] * grow
            outer = centre + (_SPHERE * semi) @ axes.T * (1.0 + node["irr"].max)
            outer = outer + (outer - centre) / np.linalg.norm(outer - centre, axis=1, keepdims=True) * cfg.node_clearance_mm
            inner = centre + (_SPHERE_INNER * semi) @ axes.T
            points = np.concatenate([outer, inner, centre[None]])
            if scene.all_fat(centre[None]) and scene.all_fat(points):
                node["centre"] = centre
                node["bound"] = shape_r
                placed.append(node)
                break
    return placed


def _sample_patient(rng: np.random.Generator, cfg: PhantomConfig, n_nodes: int | None = None, n_metastatic: int | None = None,
                    band_mm: tuple[float, float] | None = None) -> _Patient:
    width = _u(rng, band_mm or cfg.node_band_mm)
    centre = _u(rng, (-15, 15))
    band = (centre - width / 2.0, centre + width / 2.0)
    anat = _sample_anatomy(rng, band)
    cross, box = _make_cross_section(anat)
    static = _anatomy_prims(anat)
    loops = _sample_bowel(rng, anat, band, cross, static)
    branches = _sample_mesenteric_branches(rng, anat, band)
    scene = _Scene(cross, static + _bowel_prims(loops) + _branch_prims(branches))
    # node classes
    if n_nodes is None:
        n_nodes = int(rng.integers(cfg.nodes_per_case[0], cfg.nodes_per_case[1] + 1))
    if n_metastatic is None:
        if rng.random() < cfg.node_negative_patient_probability:
            classes = [False] * n_nodes
        else:
            fraction = _u(rng, cfg.metastatic_fraction_positive)
            classes = [bool(rng.random() < fraction) for _ in range(n_nodes)]
            if not any(classes):
                classes[int(rng.integers(n_nodes))] = True
    else:
        n_metastatic = int(np.clip(n_metastatic, 0, n_nodes))
        classes = [True] * n_metastatic + [False] * (n_nodes - n_metastatic)
        rng.shuffle(classes)
    nodes = _place_nodes(rng, cfg, anat, scene, branches, band, classes)
    # label values 1..n in random order (not the class order), the same in every study
    for node, value in zip(nodes, rng.permutation(len(nodes)) + 1):
        node["label_value"] = int(value)
    return _Patient(
        anatomy=anat, raster=cross, bowel=loops, nodes=nodes, band=band, body_box=box,
        oral_contrast=bool(rng.random() < cfg.oral_contrast_probability), mesenteric=branches,
    )


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
    timing = _u(rng, (0.0, 1.0))  # 0 late arterial .. 1 portal venous
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
    noise = ndimage.gaussian_filter(noise, sigma=(0.0, corr, corr), mode="wrap")
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


# ------------------------------------------------------------------------------------------------
# public API


def generate_case(
    rng_or_seed: np.random.Generator | int | Sequence[int],
    config: PhantomConfig | None = None,
    *,
    clinical_size: bool = False,
    n_nodes: int | None = None,
    n_metastatic: int | None = None,
    spacing_mm: float | None = None,
    slice_thickness_mm: float | None = None,
    tilt: bool | None = None,
    return_tissue: bool = False,
) -> PhantomCase:
    """Render one phantom study of a new patient.

    `clinical_size=True`: a benchmark-size case (512 x 512 in-plane at 0.7-0.8 mm, 110 slices of
    1.25 mm, 10 nodes, no tilt unless `tilt=True`). `n_nodes` / `n_metastatic` fix the node count /
    how many are metastatic; `spacing_mm` / `slice_thickness_mm` / `tilt` fix the scanner.
    `return_tissue=True` adds the tissue map (TISSUES ids, node i = NODE_FIRST + i).
    """
    cfg = config or PhantomConfig()
    rng = _as_rng(rng_or_seed)
    if clinical_size and n_nodes is None:
        n_nodes = cfg.clinical_nodes
    band = None
    if clinical_size:
        span = cfg.clinical_slices * (slice_thickness_mm or cfg.clinical_slice_thickness_mm)
        band = (max(span * 0.45, 20.0), max(span - 40.0, 20.0))
    patient = _sample_patient(rng, cfg, n_nodes=n_nodes, n_metastatic=n_metastatic, band_mm=band)
    study = _sample_study(rng, cfg, patient, True, clinical=clinical_size, spacing_mm=spacing_mm, slice_thickness_mm=slice_thickness_mm, tilt=tilt)
    return _render_case(patient, study, rng, return_tissue)


def sample_node_truths(seed: int, n_patients: int, config: PhantomConfig | None = None) -> list[dict]:
    """Fast path: the node truths of the first study of `n_patients` cohort patients, without rendering.

    Uses exactly the cohort's patient sampling (anatomy and node placement), so the size and class
    statistics are those of `generate_cohort(..., seed)`.
    """
    cfg = config or PhantomConfig()
    out = []
    for p in range(n_patients):
        rng = np.random.default_rng([seed, p])
        patient = _sample_patient(rng, cfg)
        for node in patient.nodes:
            out.append({
                "patient_id": f"P{p + 1:04d}",
                "metastatic": int(node["metastatic"]),
                "short_axis_mm": float(node["short_axis_mm"]),
                "long_axis_mm": float(node["long_axis_mm"]),
                "long_short_ratio": float(node["semi"].max() / node["semi"].min()),
                "necrosis": node["necrosis"] is not None,
                "fatty_hilum": node["hilum"] is not None,
                "station": node["station"],
            })
    return out


def write_case(case: PhantomCase, ct_path: str | Path, labels_path: str | Path) -> None:
    """Write CT (int16) and labels (uint16) as compressed NRRD (atomically)."""
    for image, path in ((case.ct, ct_path), (case.labels, labels_path)):
        with atomic_path(path) as tmp:
            sitk.WriteImage(image, str(tmp), True)


def _flip_indices(seed: int, n_nodes: int, label_noise: float) -> set[int]:
    count = int(round(label_noise * n_nodes))
    rng = np.random.default_rng([seed, 0x4C4E])  # separate stream for the label noise
    return set(int(i) for i in rng.choice(n_nodes, size=count, replace=False)) if count else set()


def generate_cohort(
    out_dir: str | Path,
    cases: int,
    seed: int,
    label_noise: float = 0.0,
    config: PhantomConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
    *,
    clinical_size: bool = False,
    name: str | None = None,
) -> Dataset:
    """Write a phantom dataset of `cases` studies (patients with 1-3 studies) into `out_dir`.

    dataset.json is written once, at the end (the images are written as they are made), so a
    folder with a dataset.json always holds a complete cohort. `progress(done, total)` is called
    after every case. See the module docstring for the label-noise rule.
    """
    cfg = config or PhantomConfig()
    if isinstance(cases, bool) or not isinstance(cases, (int, np.integer)) or cases < 1:
        raise InputError(f"The number of cases must be a positive integer, not {cases!r}; pass e.g. --cases 20.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"The seed must be a non-negative integer, not {seed!r}; pass e.g. --seed 1.")
    if not (isinstance(label_noise, (int, float)) and 0.0 <= float(label_noise) <= 1.0):
        raise InputError(f"The label noise must be a fraction between 0 and 1, not {label_noise!r}; pass e.g. --label-noise 0.1.")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"{out_dir} is a file; choose a folder for the phantom dataset.")
    if (out_dir / DATASET_FILE).exists():
        raise InputError(f"{out_dir} already holds a dataset; choose an empty folder for the phantom cohort.")
    seed = int(seed)
    generator = {
        "name": "phantoms",
        "seed": seed,
        "label_noise": float(label_noise),
        "label_noise_rule": "exactly round(label_noise * n_nodes) node records flipped, chosen with default_rng([seed, 0x4C4E])",
        "cases": int(cases),
        "clinical_size": bool(clinical_size),
        "phantom_version": PHANTOM_VERSION,
        "config": cfg.to_dict(),
    }
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    records: list[tuple[dict, list[dict]]] = []
    patient_index = 0
    while len(records) < cases:
        rng = np.random.default_rng([seed, patient_index])
        patient = _sample_patient(rng, cfg, n_nodes=cfg.clinical_nodes if clinical_size else None)
        n_studies = 1
        if rng.random() < cfg.multi_study_probability:
            n_studies = int(rng.integers(cfg.studies_per_multi[0], cfg.studies_per_multi[1] + 1))
        patient_id = f"P{patient_index + 1:04d}"
        for study_index in range(n_studies):
            if len(records) >= cases:
                break
            study_rng = np.random.default_rng([seed, patient_index, 1000 + study_index])
            study = _sample_study(study_rng, cfg, patient, study_index == 0, clinical=clinical_size)
            case = _render_case(patient, study, study_rng, False)
            case_id = f"{patient_id}-S{study_index + 1}"
            ct_rel, labels_rel = f"images/{case_id}_ct.nrrd", f"images/{case_id}_labels.nrrd"
            write_case(case, out_dir / ct_rel, out_dir / labels_rel)
            case_record = {"case_id": case_id, "patient_id": patient_id, "ct": ct_rel, "labels": labels_rel,
                           "phantom": {"study": study_index + 1, **case.scanner}}
            records.append((case_record, case.nodes))
            if progress is not None:
                progress(len(records), cases)
        patient_index += 1
    n_nodes = sum(len(nodes) for _, nodes in records)
    flips = _flip_indices(seed, n_nodes, float(label_noise))
    dataset = Dataset(out_dir, name=name or f"phantoms seed {seed}", created="", generator=generator)
    dataset.created = _now_iso()
    counter = 0
    for case_record, nodes in records:
        dataset.add_case(case_record["case_id"], case_record["patient_id"], case_record["ct"], case_record["labels"], phantom=case_record["phantom"])
        for truth in nodes:
            flipped = counter in flips
            counter += 1
            true_class = int(truth["metastatic"])
            truth_extra = {k: v for k, v in truth.items() if k not in ("label_value", "metastatic")}
            dataset.add_node(
                case_record["case_id"], truth["label_value"], 1 - true_class if flipped else true_class,
                true_metastatic=true_class, label_flipped=flipped, phantom=truth_extra,
            )
    dataset.save()
    return dataset


# ------------------------------------------------------------------------------------------------
# the bundled sample case

SAMPLE_CASE = {"seed": 20240607, "n_nodes": 7, "n_metastatic": 3, "spacing_mm": 0.78, "slice_thickness_mm": 2.5, "tilt": False}


def write_sample_dataset(out_dir: str | Path) -> Dataset:
    """The bundled sample: one case from SAMPLE_CASE as a dataset (Resources/SampleData)."""
    out_dir = Path(out_dir)
    if (out_dir / DATASET_FILE).exists():
        raise InputError(f"{out_dir} already holds a dataset; choose an empty folder for the sample.")
    options = dict(SAMPLE_CASE)
    seed = options.pop("seed")
    case = generate_case(seed, **options)
    case_id, patient_id = "P0001-S1", "P0001"
    ct_rel, labels_rel = f"images/{case_id}_ct.nrrd", f"images/{case_id}_labels.nrrd"
    write_case(case, out_dir / ct_rel, out_dir / labels_rel)
    generator = {"name": "phantoms", "seed": seed, "label_noise": 0.0, "sample_case": SAMPLE_CASE, "phantom_version": PHANTOM_VERSION,
                 "function": "phantoms.write_sample_dataset"}
    dataset = Dataset(out_dir, name="LymphNodeClassifier sample phantom", created="", generator=generator)
    dataset.created = _now_iso()
    dataset.add_case(case_id, patient_id, ct_rel, labels_rel, phantom={"study": 1, **case.scanner})
    for truth in case.nodes:
        extra = {k: v for k, v in truth.items() if k not in ("label_value", "metastatic")}
        dataset.add_node(case_id, truth["label_value"], truth["metastatic"], true_metastatic=truth["metastatic"], label_flipped=False, phantom=extra)
    dataset.save()
    return dataset


# ------------------------------------------------------------------------------------------------
# command line


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="phantoms", description="Write a cohort of abdominal CT phantoms as a dataset.")
    parser.add_argument("--out", required=True, help="output folder (must not hold a dataset yet)")
    parser.add_argument("--cases", type=int, required=True, help="number of studies (CT volumes)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--label-noise", type=float, default=0.0, help="fraction of node labels to flip (default 0)")
    parser.add_argument("--clinical-size", action="store_true", help="512x512x110 volumes with ~10 nodes (benchmarks)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()

    def report(done: int, total: int) -> None:
        if not args.quiet:
            print(f"\rphantoms: {done}/{total} cases", end="" if done < total else "\n", file=sys.stderr, flush=True)

    dataset = generate_cohort(args.out, args.cases, args.seed, args.label_noise, progress=report, clinical_size=args.clinical_size)
    if not args.quiet:
        n_meta = sum(1 for n in dataset.nodes if n.true_metastatic)
        print(
            f"Wrote {len(dataset.cases)} cases ({len(dataset.patient_groups())} patients, {len(dataset.nodes)} nodes, "
            f"{n_meta} metastatic) to {dataset.folder} in {time.perf_counter() - start:.1f} s",
            file=sys.stderr,
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`phantoms --out DIR --cases N --seed S [--label-noise F] [--clinical-size]`; returns an exit code."""
    args = build_parser().parse_args(argv)
    return exit_code(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
