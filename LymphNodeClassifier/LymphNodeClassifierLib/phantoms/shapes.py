"""Geometry primitives of the phantom: small rotation / sampling helpers, smooth random fields, the
evaluation targets (a fine voxel grid or a point list in the patient frame) and the shapes that
paint tissue ids onto them (ellipsoids, cylinders, capsules, bowel, kidney, vertebra, table, nodes).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .config import _lut, _OVER_FAT, _OVER_FAT_WALL, _T

# ------------------------------------------------------------------------------------------------
# small helpers


def _u(rng: np.random.Generator, bounds: Sequence) -> float:
    """Uniform on (low, high), or on a union of disjoint intervals ((low, high), (low, high), ...) with
    probability proportional to length (config.intervals); one draw either way, so a plain range keeps its stream."""
    if not isinstance(bounds[0], (int, float, np.integer, np.floating)):
        return _u_union(float(rng.random()), bounds)
    low, high = float(bounds[0]), float(bounds[1])
    return low + (high - low) * float(rng.random()) if high > low else low


def _u_union(unit: float, intervals: Sequence[Sequence[float]]) -> float:
    lengths = [float(high) - float(low) for low, high in intervals]
    position = unit * sum(lengths)
    for (low, high), length in zip(intervals, lengths):
        if position <= length:
            return float(low) + position
        position -= length
    return float(intervals[-1][1])


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
