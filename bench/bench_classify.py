"""Benchmark: patches, model and classify on a clinical-size CT, as ratios against baselines of the same run.

On a 512 x 512 x ~110 phantom CT with ~10 nodes (written to NRRD first):
- patch extraction by local resampling vs the seed pipeline (resample the whole CT to the patch
  spacing, then crop): ratio and the largest patch difference (targets: >= 20x, same patches within
  interpolation tolerance);
- model time per node (CPU batch; GPU too when CUDA is present) vs the time to read the CT file;
- in-process classify without the report vs reading the CT file (target: <= 2x the read);
- COLD (`--cold K`, default 3): the same in K fresh processes each (one per measurement, after the
  imports): the model loaded and run for the first time in the process, against the CT read in the
  same process; per-node model time of the first call; and the TorchScript execution options
  (`--jit-study`: profiling executor on/off, optimisation off, freeze, optimize_for_inference,
  fusion strategy) on the first and later calls.
Run: `python bench/bench_classify.py [--repeats N] [--seed S] [--tilt] [--model M] [--cold K] [--jit-study]`.
The model loads while the images are read, and torch's OpenMP threads wait passively, both as
`classify --ct` runs (classify.classify_case_files, cli.OPENMP_SETTINGS).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "LymphNodeClassifier"))

from LymphNodeClassifierLib.cli import OPENMP_SETTINGS  # noqa: E402

for _name, _value in OPENMP_SETTINGS.items():  # as `classify` runs (children inherit it); OMP_WAIT_POLICY=ACTIVE ... measures without
    os.environ.setdefault(_name, _value)

import torch  # noqa: E402

from LymphNodeClassifierLib.classify import DEFAULT_MODEL_PATH  # noqa: E402
from LymphNodeClassifierLib.geometry import prepare_label_image  # noqa: E402
from LymphNodeClassifierLib.inference import predict  # noqa: E402
from LymphNodeClassifierLib.model import load_model  # noqa: E402
from LymphNodeClassifierLib.nodes import extract_nodes  # noqa: E402
from LymphNodeClassifierLib.patches import extract_patches, resample_whole_volume_then_crop  # noqa: E402
from LymphNodeClassifierLib.phantoms import generate_case, write_case  # noqa: E402
from LymphNodeClassifierLib.pipeline import StageTimer, classify_images, patch_spec_from_card, window_from_card  # noqa: E402


def best_of(repeats: int, function) -> tuple[float, object]:
    """Minimum wall-clock seconds over `repeats` runs (the least disturbed by other work) and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


# -- cold: one fresh process per measurement ---------------------------------------------------------

JIT_OPTIONS = ("default", "optimized_execution_off", "profiling_executor_off", "fusion_strategy_none", "freeze", "optimize_for_inference")


def _jit_option(name: str, loaded):
    """Apply a TorchScript execution option to `loaded` (in place); returns a context for the calls."""
    if name == "optimized_execution_off":
        return lambda: torch.jit.optimized_execution(False)
    if name == "profiling_executor_off":
        torch._C._jit_set_profiling_executor(False)
    elif name == "fusion_strategy_none":
        torch.jit.set_fusion_strategy([("STATIC", 0), ("DYNAMIC", 0)])
    elif name == "freeze":
        loaded.module = torch.jit.freeze(loaded.module, preserved_attrs=["features", "head"])
    elif name == "optimize_for_inference":
        loaded.module = torch.jit.optimize_for_inference(loaded.module, other_methods=["features", "head"])
    return contextlib.nullcontext


def child_main(argv) -> int:
    """One cold measurement in this (fresh) process; prints one JSON line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["classify", "model"])
    parser.add_argument("--ct", required=True)
    parser.add_argument("--labels", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch")
    parser.add_argument("--out")
    parser.add_argument("--no-gradcam", action="store_true")
    parser.add_argument("--jit", default="default", choices=JIT_OPTIONS)
    args = parser.parse_args(argv)
    from LymphNodeClassifierLib.classify import classify_case_files
    from LymphNodeClassifierLib.gradcam import gradcam

    start = time.perf_counter()
    sitk.ReadImage(str(args.ct))
    read_s = time.perf_counter() - start  # this process's own CT read: the baseline of the same run
    out = {"read_s": read_s}
    if args.what == "classify":
        timer = StageTimer()
        start = time.perf_counter()
        # as `classify --ct` runs it: the model loads while the CT and label map are read (in a thread)
        classify_case_files(args.ct, args.labels, args.out, lambda: load_model(args.model, "cpu"), "bench", with_gradcam=not args.no_gradcam,
                            with_report=False, timer=timer, note=lambda text: None)
        out.update(classify_s=time.perf_counter() - start, stages=timer.seconds)
    else:
        batch = np.load(args.batch)
        start = time.perf_counter()
        model = load_model(args.model, "cpu")
        calls = _jit_option(args.jit, model)
        out["load_s"] = time.perf_counter() - start
        for key, function in (("predict", lambda: predict(model, batch)), ("gradcam", lambda: gradcam(model, batch))):
            times = []
            for _ in range(4):
                start = time.perf_counter()
                with calls():
                    function()
                times.append(time.perf_counter() - start)
            out[f"{key}_first_s"], out[f"{key}_later_s"] = times[0], min(times[1:])
        out["nodes"] = int(batch.shape[0])
    print(json.dumps(out))
    return 0


def run_child(*arguments: str) -> dict:
    """Run `child_main` in a fresh Python process (same interpreter, same thread settings)."""
    done = subprocess.run([sys.executable, __file__, "--child", *arguments], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONWARNINGS="ignore"))
    if done.returncode != 0:
        raise RuntimeError(f"cold child {arguments[0]} failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def cold_results(processes: int, ct_path: Path, labels_path: Path, model_path: str, batch: np.ndarray, work: Path, jit_study: bool) -> dict:
    """Medians over `processes` fresh processes per measurement, interleaved so load drifts hit all alike."""
    batch_path = work / "batch.npy"
    np.save(batch_path, batch)
    common = ["--ct", str(ct_path), "--labels", str(labels_path), "--model", model_path]
    runs: dict[str, list[dict]] = {}
    options = JIT_OPTIONS if jit_study else ("default",)
    for k in range(processes):
        runs.setdefault("classify", []).append(run_child("classify", *common, "--out", str(work / f"cold-{k}")))
        runs.setdefault("classify_without_gradcam", []).append(run_child("classify", *common, "--out", str(work / f"cold-n{k}"), "--no-gradcam"))
        for option in options:
            runs.setdefault(f"model:{option}", []).append(run_child("model", *common, "--batch", str(batch_path), "--jit", option))

    def median(key: str, field: str) -> float:
        return float(np.median([run[field] for run in runs[key]]))

    results = {"cold_processes": processes}
    for key in ("classify", "classify_without_gradcam"):
        ratios = [run["classify_s"] / run["read_s"] for run in runs[key]]
        results[f"cold_{key}_s"] = round(median(key, "classify_s"), 4)
        results[f"cold_{key}_read_s"] = round(median(key, "read_s"), 4)
        results[f"cold_{key}_to_read_ratio"] = round(float(np.median(ratios)), 2)
        results[f"cold_{key}_stages_s"] = {stage: round(float(np.median([run["stages"].get(stage, 0.0) for run in runs[key]])), 4)
                                           for stage in runs[key][0]["stages"]}
    nodes = runs["model:default"][0]["nodes"]
    results["cold_model_per_node_ms_first_call"] = round(1000 * median("model:default", "predict_first_s") / nodes, 2)
    results["cold_model_per_node_ms_later_calls"] = round(1000 * median("model:default", "predict_later_s") / nodes, 2)
    results["cold_gradcam_per_node_ms_first_call"] = round(1000 * median("model:default", "gradcam_first_s") / nodes, 2)
    if jit_study:
        results["jit_options_ms_per_node"] = {
            option: {field: round(1000 * median(f"model:{option}", f"{field}_s") / nodes, 2)
                     for field in ("predict_first", "predict_later", "gradcam_first", "gradcam_later")}
            | {"load_ms": round(1000 * median(f"model:{option}", "load_s"), 1)}
            for option in options
        }
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=20261123)
    parser.add_argument("--tilt", action="store_true", help="use a tilted direction matrix")
    parser.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    parser.add_argument("--cold", type=int, default=3, help="fresh processes per cold measurement (0: none)")
    parser.add_argument("--jit-study", action="store_true", help="also time each TorchScript execution option cold")
    args = parser.parse_args()

    load_at_start = os.getloadavg()[0]  # other work on the machine: the ratios below are same-run
    case = generate_case(args.seed, clinical_size=True, tilt=args.tilt)
    work = Path(tempfile.mkdtemp(prefix="lnc-bench-"))
    ct_path, labels_path = work / "ct.nrrd", work / "labels.nrrd"
    write_case(case, ct_path, labels_path)
    size = case.ct.GetSize()
    print(f"CT {size[0]}x{size[1]}x{size[2]} spacing {tuple(round(s, 3) for s in case.ct.GetSpacing())}, {len(case.nodes)} nodes, "
          f"{torch.get_num_threads()} torch threads")

    read_s, ct = best_of(args.repeats, lambda: sitk.ReadImage(str(ct_path)))
    labels = sitk.ReadImage(str(labels_path))
    model = load_model(args.model, "cpu")
    spec, window = patch_spec_from_card(model.card), window_from_card(model.card)
    labels_on_ct, _, _ = prepare_label_image(ct, labels)
    nodes, components = extract_nodes(labels_on_ct)

    local_s, patches = best_of(args.repeats, lambda: extract_patches(ct, components, nodes, spec, window))
    whole_s, baseline = best_of(1, lambda: resample_whole_volume_then_crop(ct, components, nodes, spec, window))
    differences = np.concatenate([np.abs(a.image - b.image).ravel() for a, b in zip(patches, baseline)])
    max_difference = float(differences.max())
    # Both paths interpolate linearly, the baseline twice: they differ most at sharp edges (bone, air).
    p99_difference, mean_difference = float(np.percentile(differences, 99)), float(differences.mean())

    batch = np.stack([patch.image for patch in patches])
    predict(model, batch)  # warm-up (TorchScript optimises on the first calls)
    model_s, _ = best_of(args.repeats, lambda: predict(model, batch))
    per_node_ms = 1000 * model_s / len(patches)

    def classify_in_process():
        timer = StageTimer()
        with timer.stage("read"):
            image = sitk.ReadImage(str(ct_path))
            label_image = sitk.ReadImage(str(labels_path))
        classify_images(image, label_image, model, with_gradcam=True, timer=timer)
        return timer.seconds

    classify_s, stage_seconds = best_of(args.repeats, classify_in_process)
    no_cam_s, _ = best_of(args.repeats, lambda: classify_images(sitk.ReadImage(str(ct_path)), sitk.ReadImage(str(labels_path)), model, with_gradcam=False))

    results = {
        "load_average_1min_at_start": round(load_at_start, 2),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "ct_read_s": round(read_s, 4),
        "patches_local_s": round(local_s, 4),
        "patches_whole_volume_s": round(whole_s, 4),
        "patches_speedup": round(whole_s / local_s, 1),
        "patches_max_abs_difference": round(max_difference, 4),
        "patches_p99_abs_difference": round(p99_difference, 4),
        "patches_mean_abs_difference": round(mean_difference, 5),
        "model_per_node_ms_cpu": round(per_node_ms, 2),
        "model_to_read_ratio": round(model_s / read_s, 3),
        "classify_s": round(classify_s, 4),
        "classify_to_read_ratio": round(classify_s / read_s, 2),
        "classify_stages_s": {key: round(value, 4) for key, value in stage_seconds.items()},
        "classify_without_gradcam_s": round(no_cam_s, 4),
        "classify_without_gradcam_to_read_ratio": round(no_cam_s / read_s, 2),
    }
    if args.cold > 0:
        results.update(cold_results(args.cold, ct_path, labels_path, args.model, batch, work, args.jit_study))
    if torch.cuda.is_available():
        gpu_model = load_model(args.model, "cuda")
        predict(gpu_model, batch)
        gpu_s, _ = best_of(args.repeats, lambda: predict(gpu_model, batch))
        results["model_per_node_ms_gpu"] = round(1000 * gpu_s / len(patches), 3)
        results["gpu"] = torch.cuda.get_device_name(0)

    print(f"patches: local {local_s * 1000:.0f} ms vs whole-volume resample {whole_s * 1000:.0f} ms -> "
          f"{whole_s / local_s:.0f}x faster (target >= 20x); patch difference (window units 0..1) "
          f"max {max_difference:.3f}, 99th percentile {p99_difference:.3f}, mean {mean_difference:.4f}")
    print(f"model: {per_node_ms:.2f} ms per node on CPU (target <= 10 ms)")
    print(f"classify in process: {classify_s:.2f} s = {classify_s / read_s:.2f}x the CT read of {read_s:.2f} s (target <= 2x); "
          f"without Grad-CAM {no_cam_s:.2f} s = {no_cam_s / read_s:.2f}x")
    if args.cold > 0:
        print(f"COLD (fresh process each, median of {args.cold}): classify {results['cold_classify_s']:.2f} s = "
              f"{results['cold_classify_to_read_ratio']:.2f}x the same process's CT read (target <= 2x); without Grad-CAM "
              f"{results['cold_classify_without_gradcam_s']:.2f} s = {results['cold_classify_without_gradcam_to_read_ratio']:.2f}x; "
              f"model {results['cold_model_per_node_ms_first_call']:.2f} ms per node on the first call, "
              f"{results['cold_model_per_node_ms_later_calls']:.2f} later (target <= 10 ms)")
    results["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child_main(sys.argv[2:]))
    sys.exit(main())
