"""Training arrays from a dataset: every labelled, non-excluded node as one patch.

For each non-excluded case: read the CT and the label map (SimpleITK), bring the label onto the
CT grid (`validate.read_case`: completeness, HU, geometry policy), split it into one node per label value
(`nodes.extract_nodes(..., per_label_value=True)`) and sample the patches
(`patches.extract_patches`) with a `PatchSpec` and a window. Each patch is matched to its
`NodeRecord` by `(case_id, label_value)`.

Not silent: a label value with no node record, a node record whose label value has no voxels,
and an unlabelled node (`metastatic` null) are skipped and listed in `PatchSet.problems`. Excluded
nodes and cases are skipped without comment (the user excluded them). A missing or unreadable
image raises `InputError` naming the case.

Cache: the arrays are stored in `<cache_dir>/patchset-<fingerprint>.npz` (written atomically) and
reused while the fingerprint is unchanged. The fingerprint is the sha256 of the dataset.json
fields that decide the arrays (cases: ids, patient, image paths, exclusion; nodes: label value,
labels, exclusion), the size and modification time of every image of a non-excluded case, the
patch spec and the window, and `CACHE_VERSION`. It goes into the model card as the training
data's fingerprint.

Extraction runs in one process by default: it takes about 0.08 s per phantom case (~7 nodes), a
few seconds per thousand nodes against minutes of training, and on 2 busy cores a 2-process pool
measured between 1.7x faster and slower; `workers > 1` is there for large real datasets.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .dataset import CaseRecord, Dataset
from .errors import CancelledError, InputError
from .fileio import atomic_path
from .nodes import NodeInfo, extract_nodes
from .patches import STACK_MODES, PatchSpec, extract_patches
from .validate import InputPolicy, read_case, training_experience

CACHE_VERSION = 1
_GENERATOR_KEYS = ("name", "seed", "cases", "label_noise", "phantom_version")  # summarised in the card
_ARRAY_FIELDS = ("x", "y", "patient_ids", "case_ids", "label_values", "short_axis_mm", "long_axis_mm", "true_y")


@dataclass
class PatchSet:
    """Patches and per-node facts, row i = one node.

    `true_y` is the phantom's class before label noise, -1 where the dataset has no truth
    (`has_truth` tells whether any node has one).
    """

    x: np.ndarray  # float32 (N, C, H, W) in [0, 1]; (N, C, D, H, W) for views "volume"
    y: np.ndarray  # int64 (N,) 0 benign / 1 metastatic, as labelled
    patient_ids: np.ndarray  # str (N,)
    case_ids: np.ndarray  # str (N,)
    label_values: np.ndarray  # int64 (N,)
    short_axis_mm: np.ndarray  # float64 (N,)
    long_axis_mm: np.ndarray  # float64 (N,)
    true_y: np.ndarray  # int64 (N,), -1 = unknown
    spec: PatchSpec
    window: tuple[float, float]
    fingerprint: str = ""
    problems: list[str] = field(default_factory=list)
    dataset_name: str = ""
    n_cases: int = 0  # non-excluded cases that were read
    from_cache: bool = False
    generator: dict | None = None  # the dataset's "generator" entry (phantoms), None for real data
    fov_grown: np.ndarray | None = None  # bool (N,): the node's view was enlarged (fov_rule grow_to_fit)
    node_features: np.ndarray | None = None  # float64 (N, F): node_features of each row, for fused models (fusion.attach_features)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def has_truth(self) -> bool:
        return bool(self.true_y.size) and bool((self.true_y >= 0).all())

    def subset(self, indices: np.ndarray) -> "PatchSet":
        """The rows `indices` as a new PatchSet (same spec, window, fingerprint; no problems)."""
        indices = np.asarray(indices, dtype=np.int64)
        arrays = {name: getattr(self, name)[indices] for name in _ARRAY_FIELDS}
        return PatchSet(
            **arrays, spec=self.spec, window=self.window, fingerprint=self.fingerprint,
            dataset_name=self.dataset_name, n_cases=len(set(arrays["case_ids"].tolist())),
            fov_grown=None if self.fov_grown is None else self.fov_grown[indices], generator=self.generator,
            node_features=None if self.node_features is None else self.node_features[indices],
        )

    def summary(self) -> dict:
        """JSON-ready description of the training data for the model card."""
        positives = int(self.y.sum())
        grown = {} if self.spec.fov_rule == "fixed" or self.fov_grown is None else {"fov_grown": int(self.fov_grown.sum())}
        return {
            "name": self.dataset_name,
            "cases": int(self.n_cases),
            "patients": int(len(set(self.patient_ids.tolist()))),
            "nodes": len(self),
            "metastatic": positives,
            "benign": len(self) - positives,
            "metastatic_fraction": round(positives / len(self), 4) if len(self) else None,
            "fingerprint": self.fingerprint,
            "problems": len(self.problems),
            "generator": {k: self.generator[k] for k in _GENERATOR_KEYS if k in self.generator} if self.generator else None,
            **grown,
            # What the model will have seen: node sizes and patch intensities (validate warns outside them).
            "experience": training_experience(
                self.short_axis_mm, self.long_axis_mm, self.x, self.spec.channels - int(self.spec.mask_channel),
                f"all {len(self)} nodes of dataset '{self.dataset_name}' (training, validation and test splits)",
            ) if len(self) else None,
        }


# --------------------------------------------------------------------------------------------
# fingerprint


def _spec_dict(spec: PatchSpec) -> dict:
    out = {"spacing_mm": list(spec.spacing_mm), "size": spec.size, "views": spec.views, "mask_channel": spec.mask_channel, "air_hu": spec.air_hu}
    if spec.fov_rule != "fixed":  # fixed specs keep their old fingerprints and caches
        out.update(fov_rule=spec.fov_rule, fov_margin=spec.fov_margin)
    if spec.views in STACK_MODES:  # only where it changes the arrays
        out["stack_offset_mm"] = spec.stack_offset_mm
    return out


def _file_stamp(path: Path, case: CaseRecord, what: str) -> list:
    try:
        stat = path.stat()
    except OSError:
        raise InputError(f"The {what} image of case '{case.case_id}' ({path}) does not exist; restore the file or exclude the case.") from None
    return [stat.st_size, stat.st_mtime_ns]


def data_fingerprint(dataset: Dataset, spec: PatchSpec, window: tuple[float, float]) -> str:
    """sha256 (hex) of everything the patch arrays depend on (see the module docstring)."""
    cases = []
    for case in dataset.cases:
        entry = [case.case_id, case.patient_id, case.ct, case.labels, case.excluded]
        if not case.per_label_value:  # the default (label_value) keeps older fingerprints and caches valid
            entry.append(case.node_definition)
        if not case.excluded:
            entry += _file_stamp(dataset.ct_path(case), case, "CT") + _file_stamp(dataset.labels_path(case), case, "label")
        cases.append(entry)
    nodes = [[n.case_id, n.label_value, n.metastatic, n.excluded, n.true_metastatic] for n in dataset.nodes]
    payload = {
        "cache_version": CACHE_VERSION,
        "cases": cases,
        "nodes": nodes,
        "spec": _spec_dict(spec),
        "window": [float(window[0]), float(window[1])],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# extraction


def case_nodes(ct_path: Path, labels_path: Path, case: CaseRecord, policy: InputPolicy = InputPolicy()) -> tuple[sitk.Image, list[NodeInfo], sitk.Image]:
    """(CT, its NodeInfos, component image on the CT grid) of a dataset case; errors name the case. The nodes
    follow the case's `node_definition` (one per label value, or per connected component), as `classify` does.

    Read and checked by `validate.read_case`, as every command does (the case's own `not_hu_ok` kept).
    """
    try:
        checked = read_case(ct_path, labels_path, policy.for_case(case))
    except InputError as error:
        raise InputError(f"Case '{case.case_id}': {error}") from None
    ct, labels_on_ct = checked.ct, checked.labels_on_ct
    infos, component_image = extract_nodes(labels_on_ct, per_label_value=case.per_label_value)
    return ct, infos, component_image


def _case_patches(ct_path: Path, labels_path: Path, case: CaseRecord, spec: PatchSpec, window: tuple[float, float],
                  policy: InputPolicy = InputPolicy()):
    """(label values, patches (n, C, H, W), short axes, long axes, fov grown) of one case, all label values."""
    ct, infos, component_image = case_nodes(ct_path, labels_path, case, policy)
    patches = extract_patches(ct, component_image, infos, spec, window)
    values = np.array([p.node.label_value for p in patches], dtype=np.int64)
    images = np.stack([p.image for p in patches]).astype(np.float32) if patches else np.zeros((0, *spec.patch_shape), np.float32)
    short = np.array([p.node.short_axis_mm for p in patches], dtype=np.float64)
    long = np.array([p.node.long_axis_mm for p in patches], dtype=np.float64)
    grown = np.array([p.fov_grown for p in patches], dtype=bool)
    return values, images, short, long, grown


def _worker_init() -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _case_job(args):
    return _case_patches(*args)


def build_patchset(
    dataset: Dataset,
    spec: PatchSpec | None = None,
    window: tuple[float, float] = (-135.0, 215.0),
    cache_dir: str | os.PathLike | None = None,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    is_cancelled: Callable[[], bool] | None = None,
    policy: InputPolicy = InputPolicy(),
) -> PatchSet:
    """The labelled, non-excluded nodes of `dataset` as a PatchSet (from the cache when valid).

    `progress(done_cases, total_cases)` is called after each case; `is_cancelled()` before each
    case (raises `CancelledError`). `workers > 1` extracts cases in a process pool. `policy`: the
    input checks' options (`--strict-geometry`, `--not-hu-ok`), as in every command.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError("build_patchset needs a dataset.Dataset (Dataset.load(folder))")
    spec = spec or PatchSpec()
    window = (float(window[0]), float(window[1]))
    if not window[0] < window[1]:
        raise InputError(f"The window low ({window[0]:g}) must be below high ({window[1]:g}); fix the window values.")
    fingerprint = data_fingerprint(dataset, spec, window)
    if policy != InputPolicy():  # another verdict on the same files: its own cache (the default keeps existing ones)
        fingerprint = hashlib.sha256(f"{fingerprint}|{policy}".encode("utf-8")).hexdigest()
    cache_file = Path(cache_dir) / f"patchset-{fingerprint}.npz" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        cached = _load_cache(cache_file, spec, window, fingerprint, dataset.generator)
        if cached is not None:
            return cached

    cases = [case for case in dataset.cases if not case.excluded]
    jobs = [(dataset.ct_path(c), dataset.labels_path(c), c, spec, window, policy) for c in cases]
    results = []

    def check_cancel() -> None:
        if is_cancelled is not None and is_cancelled():
            raise CancelledError("Patch extraction cancelled.")

    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=int(workers), initializer=_worker_init) as pool:
            futures = [pool.submit(_case_job, job) for job in jobs]
            try:
                for done, future in enumerate(futures, start=1):
                    check_cancel()
                    results.append(future.result())
                    if progress is not None:
                        progress(done, len(jobs))
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    else:
        for done, job in enumerate(jobs, start=1):
            check_cancel()
            results.append(_case_patches(*job))
            if progress is not None:
                progress(done, len(jobs))

    problems: list[str] = []
    rows_x, rows = [], []
    grown_rows: list[bool] = []
    for case, (values, images, short, long, grown) in zip(cases, results):
        records = {n.label_value: n for n in dataset.nodes_of(case.case_id)}
        found = set(values.tolist())
        for index, value in enumerate(values.tolist()):
            record = records.get(value)
            if record is None:
                problems.append(f"Case '{case.case_id}': label value {value} has no node record in dataset.json; add the node or erase it from the label map.")
                continue
            if record.excluded:
                continue
            if record.metastatic is None:
                problems.append(f"Case '{case.case_id}': node {value} is not labelled (metastatic is null); label or exclude it.")
                continue
            rows_x.append(images[index])
            truth = -1 if record.true_metastatic is None else int(record.true_metastatic)
            rows.append((case.patient_id, case.case_id, value, int(record.metastatic), float(short[index]), float(long[index]), truth))
            grown_rows.append(bool(grown[index]))
        for value, record in records.items():
            if value not in found and not record.excluded:
                problems.append(f"Case '{case.case_id}': node {value} has no voxels in the label map; fix the label map or exclude the node.")

    x = np.stack(rows_x).astype(np.float32) if rows_x else np.zeros((0, *spec.patch_shape), np.float32)
    columns = list(zip(*rows)) if rows else [[]] * 7
    patchset = PatchSet(
        x=x,
        y=np.asarray(columns[3], dtype=np.int64),
        patient_ids=np.asarray(columns[0], dtype=str),
        case_ids=np.asarray(columns[1], dtype=str),
        label_values=np.asarray(columns[2], dtype=np.int64),
        short_axis_mm=np.asarray(columns[4], dtype=np.float64),
        long_axis_mm=np.asarray(columns[5], dtype=np.float64),
        true_y=np.asarray(columns[6], dtype=np.int64),
        spec=spec,
        window=window,
        fingerprint=fingerprint,
        problems=problems,
        dataset_name=dataset.name,
        n_cases=len(cases),
        fov_grown=np.asarray(grown_rows, dtype=bool),
        generator=dataset.generator,
    )
    if cache_file is not None:
        _save_cache(cache_file, patchset)
    return patchset


# --------------------------------------------------------------------------------------------
# cache


def _save_cache(path: Path, patchset: PatchSet) -> None:
    meta = {
        "cache_version": CACHE_VERSION,
        "fingerprint": patchset.fingerprint,
        "spec": _spec_dict(patchset.spec),
        "window": list(patchset.window),
        "problems": patchset.problems,
        "dataset_name": patchset.dataset_name,
        "n_cases": patchset.n_cases,
    }
    buffer = io.BytesIO()
    arrays = {name: getattr(patchset, name) for name in _ARRAY_FIELDS}
    if patchset.fov_grown is not None:
        arrays["fov_grown"] = patchset.fov_grown
    np.savez(buffer, meta=np.array(json.dumps(meta)), **arrays)
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(buffer.getvalue())
    except OSError as error:
        raise InputError(f"Cannot write the patch cache {path} ({error.strerror}); choose a writable cache folder.") from None


def _load_cache(path: Path, spec: PatchSpec, window: tuple[float, float], fingerprint: str, generator: dict | None = None) -> PatchSet | None:
    """The cached PatchSet, or None when the file is unreadable or does not match (then rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            arrays = {name: data[name] for name in _ARRAY_FIELDS}
            fov_grown = data["fov_grown"] if "fov_grown" in data.files else None
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None
    if meta.get("fingerprint") != fingerprint or meta.get("cache_version") != CACHE_VERSION or meta.get("spec") != _spec_dict(spec):
        return None
    return PatchSet(
        **arrays, spec=spec, window=window, fingerprint=fingerprint, problems=list(meta.get("problems", [])),
        dataset_name=meta.get("dataset_name", ""), n_cases=int(meta.get("n_cases", 0)), from_cache=True,
        fov_grown=fov_grown, generator=generator,
    )
