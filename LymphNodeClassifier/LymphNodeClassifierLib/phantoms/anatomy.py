"""The patient's anatomy: body outline and abdominal wall, spine, vessels, organs, bowel loops and
mesenteric branches, sampled per patient in the patient frame (mm, LPS) as shape primitives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .config import _lut, _OVER_FAT, _OVER_FAT_WALL, _T
from .shapes import (
    _BowelLumen, _Capsule, _CrossSection, _Cylinder, _Ellipsoid, _Kidney, _paint, _PointTarget, _Prim, _random_unit, _rot_x,
    _rot_y, _rot_z, _u, _unit, _Vertebra,
)

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
