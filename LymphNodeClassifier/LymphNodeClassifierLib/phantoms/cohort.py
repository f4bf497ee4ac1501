"""The public generator API (`generate_case`, `sample_node_truths`, `write_case`, `generate_cohort`),
the bundled sample case and the `phantoms` command line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from ..cli import ProgressLine, exit_code
from ..dataset import DATASET_FILE, Dataset, _now_iso
from ..errors import InputError, OneLineArgumentParser
from ..fileio import atomic_path
from .config import PHANTOM_VERSION, PRESETS, PhantomCase, PhantomConfig, preset_config
from .nodes import _sample_patient
from .scanner import _as_rng, _render_case, _sample_study

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
    parser = parser or OneLineArgumentParser(prog="python -m LymphNodeClassifierLib phantoms", description="Write a cohort of abdominal CT phantoms as a dataset.")
    parser.add_argument("--out", required=True, help="output folder (must not hold a dataset yet)")
    parser.add_argument("--cases", type=int, required=True, help="number of studies (CT volumes)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--label-noise", type=float, default=0.0, help="fraction of node labels to flip (default 0)")
    parser.add_argument("--clinical-size", action="store_true", help="512x512x110 volumes with ~10 nodes (benchmarks)")
    parser.add_argument("--preset", choices=list(PRESETS), default="default",
                        help="generator settings: default; randomised (training: wider scanner, contrast, tissue and node-texture ranges with holes where unseen draws); "
                             "unseen (test: scanners, contrast timing and node texture never used in training)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()

    progress = None if args.quiet else ProgressLine("phantom cases", args.cases)  # ended before an error line too (cli)

    def report(done: int, total: int) -> None:
        if progress is not None:
            progress.update(done)

    dataset = generate_cohort(args.out, args.cases, args.seed, args.label_noise, config=preset_config(args.preset), progress=report,
                              clinical_size=args.clinical_size, name=None if args.preset == "default" else f"phantoms seed {args.seed}, {args.preset} settings")
    if progress is not None:
        progress.done()
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
    return exit_code(lambda: run(build_parser().parse_args(argv)))  # a bad option is one line and exit 2 too


if __name__ == "__main__":
    sys.exit(main())
