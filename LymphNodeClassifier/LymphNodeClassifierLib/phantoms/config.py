"""Phantom settings and results: `PhantomConfig` (every range the generator draws from), the tissue ids
of the optional tissue map (`TISSUES`, `NODE_FIRST`) and `PhantomCase` (one rendered study).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

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
    """Every range the generator draws from ((low, high) uniform unless said otherwise). The fields
    marked "union ok" may also be a union of disjoint intervals ((low, high), (low, high), ...), drawn
    uniformly over their total length (`intervals`): training ranges with a hole where a test preset sits."""

    # scanner
    spacing_xy_mm: tuple[float, float] = (0.6, 0.98)
    slice_thickness_choices_mm: tuple[float, ...] = (0.8, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0)
    supersample_step_mm: float = 1.25  # z sub-sample step for partial-volume averaging
    psf_sigma_mm: tuple = (0.6, 1.2)  # in-plane Gaussian blur (sigma); union ok
    noise_sigma_hu: tuple = (8.0, 25.0)  # union ok
    noise_correlation_px: tuple = (0.5, 0.9)  # in-plane smoothing of the noise (sigma, pixels); union ok
    # reconstruction kernel's noise texture, one drawn per study (NOISE_KERNELS): "smooth" = low-pass
    # (soft-tissue kernel), "sharp" = band-pass, peaked at mid frequencies (sharp / bone kernel)
    noise_kernels: tuple[str, ...] = ("smooth",)
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
    benign_texture_hu: tuple[float, float] = (1.0, 3.0)
    node_texture_wavelength_mm: tuple = (2.5, 7.0)  # grain of the node texture (both classes); union ok
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
    contrast_timing: tuple = (0.0, 1.0)  # 0 late arterial .. 1 portal venous; > 1 delayed (vessels fade); union ok
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

    def __post_init__(self) -> None:
        self.noise_kernels = tuple(self.noise_kernels)
        unknown = [k for k in self.noise_kernels if k not in NOISE_KERNELS]
        if not self.noise_kernels or unknown:
            raise InputError(f"Unknown noise kernel(s) {unknown or 'none given'}; use one or more of: {', '.join(NOISE_KERNELS)}.")

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def with_overrides(cls, overrides: dict) -> "PhantomConfig":
        """The default config with some fields replaced (lists become tuples); unknown names are an InputError."""
        fields = set(cls.__dataclass_fields__)
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise InputError(f"Unknown phantom setting(s) {', '.join(unknown)}; use fields of PhantomConfig such as noise_sigma_hu.")
        def frozen(value):  # JSON lists (a union's intervals too) back to tuples
            return tuple(frozen(v) for v in value) if isinstance(value, (list, tuple)) else value

        return cls(**{key: frozen(value) for key, value in overrides.items()})


NOISE_KERNELS = ("smooth", "sharp")


def intervals(bounds) -> list[tuple[float, float]]:
    """A range field as a list of (low, high) intervals: [(low, high)] for a plain range, the union's parts otherwise."""
    if isinstance(bounds[0], (int, float, np.integer, np.floating)):
        return [(float(bounds[0]), float(bounds[1]))]
    return [(float(low), float(high)) for low, high in bounds]

# Generator settings never used to train the bundled phantom model (trained on the defaults): other
# slice thicknesses, noisier and sharper-kernel scanners with a wider PSF, delayed-phase contrast
# (vessels and kidneys fade towards soft tissue) and a coarser / finer node texture grain. The class
# signal itself (node sizes, shapes, HU) is the default's. `phantoms --preset unseen`.
PRESETS: dict[str, dict] = {
    "default": {},
    "unseen": {
        "slice_thickness_choices_mm": (1.5, 3.75, 4.0),
        "psf_sigma_mm": (1.2, 1.6),
        "noise_sigma_hu": (20.0, 35.0),
        "noise_correlation_px": (0.9, 1.3),
        "noise_kernels": ("sharp", "smooth"),
        "contrast_timing": (1.0, 1.6),  # beyond portal venous: the aorta fades (wider range below), medulla > cortex
        "aorta_hu": (100.0, 250.0),
        "node_texture_wavelength_mm": (1.5, 10.0),
    },
    # Domain randomisation for TRAINING cohorts (`phantoms --preset randomised`): wider than the
    # defaults in everything a scanner and a patient change, but with holes wherever "unseen" draws,
    # so that "unseen" stays a test of settings never used in training (Testing/test_phantoms.py
    # checks the two are disjoint): unseen values lie in the holes (PSF, noise level and grain,
    # contrast timing, node texture grain, slice thickness: interpolation between trained values) and
    # the unseen aorta and arteries (85-115 HU after their delayed-phase fade) lie below every
    # trained one (>= 120 HU). Shared by both: the two noise-kernel families (their grain, noise_correlation_px,
    # is disjoint) and, at their default ranges, pixel size, tilt and the class signal (node sizes,
    # shapes, HU, texture amplitude), which no preset changes. Fat, vessels, muscle, bowel fluid and
    # oral contrast, which "unseen" leaves at their defaults, are widened around them.
    "randomised": {
        "slice_thickness_choices_mm": (0.8, 1.0, 1.25, 2.0, 2.5, 3.0, 5.0, 6.0),
        "psf_sigma_mm": ((0.4, 1.15), (1.65, 2.2)),
        "noise_sigma_hu": ((5.0, 19.5), (35.5, 50.0)),
        "noise_correlation_px": ((0.3, 0.85), (1.35, 1.8)),
        "noise_kernels": ("smooth", "sharp"),
        "contrast_timing": ((0.0, 0.95), (1.65, 2.0)),
        "aorta_hu": (135.0, 320.0),
        "ivc_hu": (80.0, 170.0),
        "liver_hu": (55.0, 100.0),
        "visceral_fat_hu": (-125.0, -75.0),
        "subcutaneous_fat_hu": (-125.0, -85.0),
        "muscle_hu": (35.0, 65.0),
        "bowel_fluid_hu": (-5.0, 35.0),
        "oral_contrast_probability": 0.5,
        "node_texture_wavelength_mm": ((0.8, 1.45), (10.5, 16.0)),
    },
}


def preset_config(name: str) -> PhantomConfig:
    """The PhantomConfig of a named preset (PRESETS)."""
    if name not in PRESETS:
        raise InputError(f"Unknown phantom preset '{name}'; use one of: {', '.join(PRESETS)}.")
    return PhantomConfig.with_overrides(PRESETS[name])


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
