"""Data exploration and automatic case checks for a dataset folder.

`explore --dataset DIR --out DIR` writes `exploration.json` (per-case scanner figures, node sizes by
class and every problem found) and `exploration.png` (histograms of in-plane spacing, slice
thickness, slice count, HU range and node short axis by class). The same checks list the cases a
curator should look at: unreadable or empty images, missing or empty masks, masks outside the CT,
geometry mismatch, an HU range that is not a CT, nodes too small to classify, and nodes in the
manifest without voxels in the label map (or the reverse).

Exclusions are the curator's verdict: excluded cases and nodes are checked and listed per case, but
left out of the counts, the histograms and the cases to review (the summary's `excluded` counts them).
Nodes follow each case's `node_definition`, as in every other command.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from .dataset import CaseRecord, Dataset
from .errors import InputError, OneLineArgumentParser
from .cli import ProgressLine
from .fileio import atomic_path, atomic_write_json, check_writable_folder
from .nodes import extract_nodes
from .validate import InputPolicy, add_input_options, check_ct, read_image, size_warnings
from .validate import labels_on_ct as validate_labels_on_ct

@dataclass
class Problem:
    kind: str  # short machine name, e.g. "empty_mask"
    message: str  # one sentence for the curator
    label_value: int | None = None


@dataclass
class CaseCheck:
    case_id: str
    patient_id: str
    problems: list[Problem] = field(default_factory=list)
    spacing_mm: tuple[float, float, float] | None = None
    size: tuple[int, int, int] | None = None
    tilted: bool | None = None
    hu_min: float | None = None
    hu_max: float | None = None
    hu_p01: float | None = None
    hu_p99: float | None = None
    nodes: list[dict] = field(default_factory=list)  # label_value, short_axis_mm, long_axis_mm, volume_mm3, metastatic


def _read(path: Path, what: str, case_id: str, problems: list[Problem]) -> sitk.Image | None:
    if not path.exists():
        problems.append(Problem(f"missing_{'ct' if what == 'CT' else 'mask'}", f"Case {case_id}: the {what} file {path.name} is missing."))
        return None
    try:
        return read_image(path, what)
    except InputError as error:
        kind = "incomplete" if "incomplete" in str(error) else "unreadable"
        problems.append(Problem(f"{kind}_{'ct' if what == 'CT' else 'mask'}", f"Case {case_id}: {error}"))
        return None


def check_case(dataset: Dataset, case: CaseRecord, policy: InputPolicy = InputPolicy()) -> CaseCheck:
    """Read one case and list what is wrong with it (never raises for a bad case).

    The verdicts are `validate`'s, the same every other command gives for this case.
    """
    check = CaseCheck(case.case_id, case.patient_id)
    problems = check.problems
    policy = policy.for_case(case)
    ct = _read(dataset.ct_path(case), "CT", case.case_id, problems)
    labels = _read(dataset.labels_path(case), "label", case.case_id, problems)
    if ct is not None and ct.GetDimension() == 3 and ct.GetNumberOfComponentsPerPixel() == 1:
        array = sitk.GetArrayViewFromImage(ct)
        check.spacing_mm = tuple(float(s) for s in ct.GetSpacing())
        check.size = tuple(int(s) for s in ct.GetSize())
        check.tilted = not np.allclose(np.array(ct.GetDirection()).reshape(3, 3), np.eye(3), atol=1e-6)
        check.hu_min, check.hu_max = float(array.min()), float(array.max())
        check.hu_p01, check.hu_p99 = (float(v) for v in np.percentile(array[:: max(1, array.shape[0] // 8)], [1, 99]))
    if ct is not None:
        try:
            check_ct(ct, dataset.ct_path(case), policy)
        except InputError as error:
            kind = "empty_image" if "empty" in str(error) else "implausible_hu" if "Hounsfield" in str(error) else "bad_image"
            problems.append(Problem(kind, f"Case {case.case_id}: {error}"))
            ct = None
    if ct is None or labels is None:
        return check
    try:
        labels_on_ct, notes = validate_labels_on_ct(ct, labels, dataset.labels_path(case), policy)
    except InputError as error:
        text = str(error)
        kind = ("mask_outside_ct" if "outside the CT" in text or "overlap" in text else "empty_mask" if "empty" in text
                else "geometry_mismatch" if "strict-geometry" in text else "bad_mask")
        problems.append(Problem(kind, f"Case {case.case_id}: {error}"))
        return check
    for note in notes:
        problems.append(Problem("geometry_mismatch", f"Case {case.case_id}: {note}"))
    nodes, _ = extract_nodes(labels_on_ct, per_label_value=case.per_label_value)
    records = {record.label_value: record for record in dataset.nodes_of(case.case_id)}
    for node in nodes:
        record = records.get(node.label_value)
        check.nodes.append(
            {
                "label_value": node.label_value,
                "short_axis_mm": node.short_axis_mm,
                "long_axis_mm": node.long_axis_mm,
                "volume_mm3": node.volume_mm3,
                "touches_edge": node.touches_edge,
                "metastatic": None if record is None else record.metastatic,
                "excluded": None if record is None else record.excluded,
            }
        )
        if record is None:
            problems.append(
                Problem("node_without_record", f"Case {case.case_id}: label value {node.label_value} has no node in dataset.json.", node.label_value)
            )
        for warning in size_warnings(node):
            kind = "node_too_small" if "too small" in warning else "implausible_node_size"
            problems.append(Problem(kind, f"Case {case.case_id}: node {node.label_value}: {warning}.", node.label_value))
    present = {node.label_value for node in nodes}
    for label_value in sorted(set(records) - present):
        problems.append(
            Problem(
                "missing_node_mask",
                f"Case {case.case_id}: node {label_value} is in dataset.json but has no voxels in the mask.",
                label_value,
            )
        )
    return check


def explore_dataset(
    dataset: Dataset, out_dir: str | Path, progress: Callable[[int, int], None] | None = None, policy: InputPolicy = InputPolicy(),
) -> dict:
    """Check every case, write `exploration.json` and `exploration.png` into `out_dir`, return the summary."""
    out_dir = Path(out_dir)
    checks = []
    for index, case in enumerate(dataset.cases):
        checks.append(check_case(dataset, case, policy))
        if progress:
            progress(index + 1, len(dataset.cases))
    summary = summarise(dataset, checks)
    atomic_write_json(out_dir / "exploration.json", summary)
    plot_exploration(included(dataset, checks), out_dir / "exploration.png")
    return summary


def included(dataset: Dataset, checks: Sequence[CaseCheck]) -> list[CaseCheck]:
    """The checks of the cases not excluded, each without its excluded nodes."""
    return [replace(check, nodes=[node for node in check.nodes if not node["excluded"]])
            for check in checks if not dataset.case(check.case_id).excluded]


def summarise(dataset: Dataset, all_checks: Sequence[CaseCheck]) -> dict:
    checks = included(dataset, all_checks)
    node_rows = [node for check in checks for node in check.nodes]
    by_class: dict[str, list[float]] = {"metastatic": [], "benign": [], "unlabelled": []}
    for node in node_rows:
        key = {1: "metastatic", 0: "benign"}.get(node["metastatic"], "unlabelled")
        by_class[key].append(node["short_axis_mm"])
    problems = [asdict(problem) | {"case_id": check.case_id} for check in checks for problem in check.problems]
    kinds: dict[str, int] = {}
    for problem in problems:
        kinds[problem["kind"]] = kinds.get(problem["kind"], 0) + 1
    return {
        "dataset": str(dataset.folder),
        "cases": len(checks),
        "patients": len({check.patient_id for check in checks}),
        "nodes": len(node_rows),
        "nodes_by_class": {key: len(values) for key, values in by_class.items()},
        "short_axis_mm_median_by_class": {key: (float(np.median(v)) if v else None) for key, v in by_class.items()},
        "cases_with_problems": sorted({problem["case_id"] for problem in problems}),
        "problem_counts": kinds,
        "problems": problems,
        "excluded": {"cases": len(all_checks) - len(checks),
                     "nodes": sum(len(check.nodes) for check in all_checks) - len(node_rows)},
        "per_case": [
            {key: value for key, value in asdict(check).items() if key not in ("problems",)}
            | {"excluded": dataset.case(check.case_id).excluded} for check in all_checks
        ],
    }


def plot_exploration(checks: Sequence[CaseCheck], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    readable = [check for check in checks if check.spacing_mm is not None]
    figure, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    panels = [
        ("In-plane spacing (mm)", [check.spacing_mm[0] for check in readable]),
        ("Slice thickness (mm)", [check.spacing_mm[2] for check in readable]),
        ("Slices per CT", [check.size[2] for check in readable]),
        ("CT 1st percentile (HU)", [check.hu_p01 for check in readable]),
        ("CT 99th percentile (HU)", [check.hu_p99 for check in readable]),
    ]
    for axis, (title, values) in zip(axes.flat, panels):
        axis.hist(values, bins=_bins(values), color="#4c72b0")
        axis.set_title(title)
        axis.set_ylabel("cases")
    axis = axes.flat[5]
    for label, value, colour in (("benign", 0, "#2ca02c"), ("metastatic", 1, "#d62728")):
        sizes = [node["short_axis_mm"] for check in checks for node in check.nodes if node["metastatic"] == value]
        if sizes:
            axis.hist(sizes, bins=_bins(sizes), alpha=0.6, color=colour, label=f"{label} (n={len(sizes)})")
    axis.set_title("Node short axis by class (mm)")
    axis.set_ylabel("nodes")
    axis.legend()
    n_problem_cases = len({check.case_id for check in checks if check.problems})
    figure.suptitle(f"{len(checks)} cases, {sum(len(c.nodes) for c in checks)} nodes, {n_problem_cases} cases to review")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)


def _bins(values: Sequence[float]) -> int | np.ndarray:
    # numpy refuses 20 bins over a range narrower than float resolution (e.g. one scanner's spacing).
    if not values or np.ptp(values) < 1e-3:
        centre = float(values[0]) if values else 0.0
        return np.array([centre - 0.5, centre + 0.5])
    return 20


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineArgumentParser(prog="python -m LymphNodeClassifierLib explore", description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="dataset folder (with dataset.json)")
    parser.add_argument("--out", help="output folder (default: DATASET/exploration)")
    add_input_options(parser)
    args = parser.parse_args(argv)
    dataset = Dataset.load(args.dataset)
    out_dir = check_writable_folder(Path(args.out) if args.out else Path(args.dataset) / "exploration")  # before any work
    progress = ProgressLine("cases checked", len(dataset.cases))
    summary = explore_dataset(dataset, out_dir, progress=lambda done, total: progress.update(done), policy=InputPolicy.from_args(args))
    progress.done()
    print(
        f"{summary['cases']} cases, {summary['nodes']} nodes ({summary['nodes_by_class']['metastatic']} metastatic, "
        f"{summary['nodes_by_class']['benign']} benign); {len(summary['cases_with_problems'])} cases to review; "
        f"wrote {out_dir / 'exploration.json'} and {out_dir / 'exploration.png'}"
    )
    for problem in summary["problems"]:
        print(f"  {problem['message']}")
    return 0
