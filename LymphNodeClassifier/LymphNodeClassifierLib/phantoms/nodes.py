"""Lymph nodes: size, shape and texture per class (benign / metastatic), placement in retroperitoneal
or mesenteric fat clear of organs and other nodes, and the whole patient (`_sample_patient`).
"""

from __future__ import annotations

import math

import numpy as np

from .config import PhantomConfig
from .shapes import _CosField, _Harmonics, _random_unit, _SPHERE, _SPHERE_INNER, _u, _unit
from .anatomy import (
    _anatomy_prims, _bowel_prims, _branch_prims, _cavity_radius, _make_cross_section, _Patient, _sample_anatomy, _sample_bowel,
    _sample_mesenteric_branches, _Scene,
)

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
        "field": _CosField(rng, 5, cfg.node_texture_wavelength_mm),
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
        node["texture_hu"] = _u(rng, cfg.benign_texture_hu)
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
