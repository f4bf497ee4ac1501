"""Training in a background process on a real slicer-core scene with a real worker subprocess:
events stream into the curve table, cancel stops the worker within seconds and leaves no model,
a finished run installs a model whose card loads and compares it with the active model and the
size rule on the same test nodes; make-active switches active_model.json."""

import json
import math
import os
import stat
import sys
import time
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

from LymphNodeClassifierLib import model_registry  # noqa: E402
from LymphNodeClassifierLib.model import load_model  # noqa: E402
from LymphNodeClassifierLib.train_worker import options_to_argv  # noqa: E402
from LymphNodeClassifierLogic import training_process as tp  # noqa: E402
from helpers import export_untrained_model  # noqa: E402

# The grace period the tests give a cancel before the kill. Whether the worker stopped by itself is
# told by its own `cancelled` event (a kill leaves a synthesized one); the time only has to stay
# below the grace, generously, as the shared test machine can be several times overloaded.
CANCEL_SECONDS = 30.0


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return tp.make_tiny_cohort(tmp_path_factory.mktemp("tiny") / "cohort")


@pytest.fixture(scope="module")
def previous_model(tmp_path_factory) -> Path:
    return export_untrained_model(tmp_path_factory.mktemp("previous") / "previous.pt", size=32, spacing_mm=1.58, seed=1, name="previous model")


@pytest.fixture()
def models(tmp_path, previous_model) -> Path:
    folder = tmp_path / "models"
    model_registry.install_model(folder, previous_model, make_active=True)
    return folder


def folder_state(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_options_become_worker_arguments():
    argv = options_to_argv({"epochs": 3, "flips": False, "mask_channel": True, "learning_rate": 0.001,
                            "split_fractions": (0.8, 0.1, 0.1), "num_threads": None, "compare_model": "none"})
    assert argv == ["--epochs", "3", "--no-flips", "--mask-channel", "--learning-rate", "0.001",
                    "--split-fractions", "0.8", "0.1", "0.1", "--compare-model", "none"]


def test_curves_and_results_table_from_events():
    scene = slicer.vtkMRMLScene()
    curves = tp.TrainingCurves(scene)
    assert curves.update({"event": "epoch", "epoch": 1, "train_loss": 0.7, "val_loss": 0.8, "val_auc": None})
    assert not curves.update({"event": "patches", "done": 1, "total": 2})
    curves.update({"event": "epoch", "epoch": 2, "train_loss": 0.5, "val_loss": 0.6, "val_auc": 0.75})
    assert curves.column("epoch") == [1, 2] and curves.column("val_loss") == [0.8, 0.6]
    assert str(curves.column("val_auc")[0]) == "nan"
    chart = curves.chart_node
    assert chart.GetNumberOfPlotSeriesNodes() == 3
    for series in curves.series_nodes:
        assert series.GetTableNode() is curves.table_node and series.GetXColumnName() == "epoch"
    curves.update({"event": "start", "fold": 2, "folds": 5})
    assert curves.rows == 0 and "fold 2 of 5" in chart.GetTitle()

    block = {"auc": 0.8, "accuracy": 0.7, "sensitivity": 0.6, "specificity": None, "ppv": 0.5, "npv": 0.9, "n": 10, "n_positive": 4,
             "ci95": {"auc": [0.6, 0.95], "accuracy": None}, "tp": 3, "fn": 1, "fp": 2, "tn": 4,
             "roc": {"fpr": [0.0, 0.5, 1.0], "tpr": [0.0, 0.75, 1.0]}}
    done = {"event": "done", "model_path": "/x/job.pt", "comparison": {
        "test_set": {"nodes": 10, "metastatic": 4}, "new_model": block,
        "active_model": {"path": "/x/old.pt", "error": "could not be read"},
        "size_rule": {**block, "rule": "metastatic when short_axis_mm >= 10"}}}
    node = tp.results_table(done, scene)
    rows = tp.table_rows(node)
    assert [node.GetTable().GetColumnName(c) for c in range(4)] == list(tp.RESULT_COLUMNS)
    assert [r[0] for r in rows] == ["model", "test nodes (metastatic)", "ACC", "AUC", "Sensitivity", "Specificity", "PPV", "NPV",
                                    tp.CONFUSION_ROW, "Brier score", "ECE", tp.THRESHOLD_ROW]
    assert rows[8] == [tp.CONFUSION_ROW, "3 / 1 / 2 / 4", "", "3 / 1 / 2 / 4"]
    assert rows[9:] == [["Brier score", "n/a", "n/a", "n/a"], ["ECE", "n/a", "n/a", "n/a"], [tp.THRESHOLD_ROW, "", "", ""]]
    assert tp.reliability_chart(done, scene) == []  # no calibration in these events
    assert rows[0][1] == "job.pt" and "could not be read" in rows[0][2]
    roc = tp.roc_chart(done, scene)  # the active model could not be read: two curves
    chart, roc_table = roc[0], roc[1].GetTable()
    assert chart.GetNumberOfPlotSeriesNodes() == 2 and "10 nodes" in chart.GetTitle()
    assert [roc_table.GetValue(r, roc_table.GetColumnIndex("new model tpr")).ToDouble() for r in range(3)] == [0.0, 0.75, 1.0]
    assert tp.roc_chart({"event": "done", "comparison": {"error": "no test set"}}, scene) == []
    # curves of different lengths share one table: the shorter one ends in NaN (plots skip those points)
    short = {**block, "roc": {"fpr": [0.0, 1.0], "tpr": [0.0, 1.0]}}
    uneven = tp.roc_chart({**done, "comparison": {**done["comparison"], "size_rule": short}}, scene)
    column = uneven[1].GetTable().GetColumnByName("size rule tpr")
    assert [column.GetValue(r) for r in range(2)] == [0.0, 1.0] and math.isnan(column.GetValue(2))
    assert rows[3][1] == "0.800 [0.600, 0.950]" and rows[2][1] == "0.700" and rows[5][1] == "n/a" and rows[3][2] == "n/a"
    again = tp.results_table({"event": "done", "comparison": {"error": "no test set"}}, table_node=node)
    assert again is node and tp.table_rows(node) == [["test set", "no test set", "", ""]]


def test_calibration_rows_and_reliability_diagram_from_the_worker_metrics():
    """Issue 13 item 4: Brier / ECE (95 % CI), the threshold rule and a reliability plot per column,
    from the blocks metrics.calibration writes, checked against scikit-learn's own functions."""
    import numpy as np
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    from LymphNodeClassifierLib.metrics import calibration

    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 200)
    p_new = np.clip(0.25 + 0.5 * y + rng.normal(0, 0.15, 200), 0, 1)
    p_size = (rng.random(200) < 0.3 + 0.4 * y).astype(float)  # a 0/1 rule
    new = {"threshold": 0.41, "threshold_rule": "youden", "calibration": calibration(y, p_new, n_boot=50, seed=1, groups=np.arange(200) // 2)}
    size = {"rule": "metastatic when short_axis_mm >= 10", "threshold_rule": "metastatic when short_axis_mm >= 10",
            "calibration": calibration(y, p_size)}
    done = {"event": "done", "model_path": "/x/job.pt", "comparison": {
        "test_set": {"nodes": 200, "metastatic": int(y.sum()), "split": "test split"}, "new_model": new, "active_model": None, "size_rule": size}}
    scene = slicer.vtkMRMLScene()
    rows = {row[0]: row for row in tp.results_rows(done)}
    brier, ci = new["calibration"]["brier"], new["calibration"]["ci95"]["brier"]
    assert rows["Brier score"][1] == f"{brier_score_loss(y, p_new):.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    assert rows["Brier score"][3] == f"{brier_score_loss(y, p_size):.3f}" == f"{np.mean(p_size != y):.3f}"
    assert rows["ECE"][1].startswith(f"{new['calibration']['ece']:.3f} [") and rows["ECE"][2] == "n/a"
    assert rows[tp.THRESHOLD_ROW][1:] == ["youden: 0.410", "", "metastatic when short_axis_mm >= 10"]

    nodes = tp.reliability_chart(done, scene)
    chart, table = nodes[0], nodes[1].GetTable()
    assert chart.IsA("vtkMRMLPlotChartNode") and chart.GetNumberOfPlotSeriesNodes() == 3  # new, size rule, diagonal
    assert "200 nodes" in chart.GetTitle()
    fraction, mean_predicted = calibration_curve(y, p_new, n_bins=10, strategy="uniform")
    series = chart.GetNthPlotSeriesNode(0)
    x = [table.GetValue(r, table.GetColumnIndex(series.GetXColumnName())).ToDouble() for r in range(table.GetNumberOfRows())]
    yy = [table.GetValue(r, table.GetColumnIndex(series.GetYColumnName())).ToDouble() for r in range(table.GetNumberOfRows())]
    shown = [i for i, v in enumerate(x) if math.isfinite(v)]
    np.testing.assert_allclose([x[i] for i in shown], mean_predicted)
    np.testing.assert_allclose([yy[i] for i in shown], fraction)
    size_series = chart.GetNthPlotSeriesNode(1)
    size_x = [table.GetValue(r, table.GetColumnIndex(size_series.GetXColumnName())).ToDouble() for r in range(table.GetNumberOfRows())]
    assert [v for v in size_x if math.isfinite(v)] == [0.0, 1.0]  # a 0/1 rule fills the first and last bins only
    assert chart.GetNthPlotSeriesNode(2).GetName() == "perfectly calibrated"


def test_streamed_epochs_fill_the_curves_and_cancel_leaves_no_model(cohort, models):
    scene = slicer.vtkMRMLScene()
    before = folder_state(models)
    active_before = model_registry.active_model(models)
    options = {**tp.TINY_OPTIONS, "epochs": 500, "patience": 500}
    run = tp.TrainingRun(scene, cohort, models, options)
    run.start()
    deadline = time.monotonic() + 90
    while run.curves.rows < 2 and not run.finished and time.monotonic() < deadline:
        run.step()
        time.sleep(0.05)
    assert not run.finished, f"the run ended early: {run.outcome} {run.message} {run.process.stderr_tail()}"
    assert run.curves.rows >= 2 and run.process.is_running
    kinds = [e["event"] for e in run.process.events]
    assert kinds[:2] == ["started", "config"] and "patches" in kinds and "data" in kinds and "start" in kinds
    assert 0.1 <= run.progress < 0.2 and run.status.startswith("Epoch")
    assert all(loss > 0 for loss in run.curves.column("train_loss"))

    started = time.monotonic()
    run.cancel(wait=True, timeout=CANCEL_SECONDS)
    elapsed = time.monotonic() - started
    assert not run.process.is_running and elapsed < CANCEL_SECONDS, f"cancel took {elapsed:.1f} s"
    run.wait(timeout=10)
    assert run.outcome == "cancelled", (run.outcome, run.message)
    assert run.process.returncode == 130 and run.process.final_event["event"] == "cancelled"
    assert "synthesized" not in run.process.final_event  # the worker said so itself: a clean exit
    assert folder_state(models) == before, "cancelling changed the model folder"
    assert model_registry.active_model(models) == active_before


def test_finished_run_installs_a_model_compared_on_the_same_test_set(cohort, models, previous_model):
    scene = slicer.vtkMRMLScene()
    active_before = model_registry.active_model(models)
    run = tp.TrainingRun(scene, cohort, models, dict(tp.TINY_OPTIONS))
    run.start()
    run.wait(timeout=120)
    assert run.outcome == "done", (run.outcome, run.message, run.process.stderr_tail())
    done = run.done_event
    assert run.process.returncode == 0 and run.progress == 1.0
    assert run.curves.rows == done["training"]["epochs_run"] == 2

    model_path = Path(done["model_path"])
    assert model_path == models / f"{run.process.job_id}.pt"
    loaded = load_model(model_path)
    assert loaded.card["preprocessing"]["patch_size"] == 32 and loaded.card["training"]["epochs"] == 2
    assert not [p for p in models.iterdir() if p.name.startswith(".")], "temporary files left behind"
    assert model_registry.active_model(models) == active_before  # training never switches the model by itself

    comparison = done["comparison"]
    test_nodes = comparison["test_set"]["nodes"]
    assert test_nodes > 0
    new, active, size = comparison["new_model"], comparison["active_model"], comparison["size_rule"]
    assert new["n"] == active["n"] == size["n"] == test_nodes
    assert new["n_positive"] == active["n_positive"] == size["n_positive"]
    assert "error" not in active and active["name"] == "previous model"
    for block in (new, active, size):  # issue 13 item 4: each column's calibration on the same nodes
        calibration = block["calibration"]
        assert sum(calibration["reliability"]["counts"]) == test_nodes and 0 <= calibration["ece"] <= 1
        assert 0 <= calibration["brier"] <= 1 and len(calibration["ci95"]["brier"]) == 2
        assert block["threshold_rule"]
    assert new["threshold_rule"] == "youden" and "short_axis_mm >= 10" in size["threshold_rule"]
    size_error_rate = (size["fp"] + size["fn"]) / size["n"]  # the rule's 0/1 prediction is its probability
    assert size["calibration"]["brier"] == pytest.approx(size_error_rate)
    assert active["model"]["card_decision_threshold"] == pytest.approx(0.5)
    saved = json.loads(Path(done["metrics_path"]).read_text())
    assert saved["comparison"]["test_set"] == comparison["test_set"] and saved["model_path"] == str(model_path)

    rows = tp.table_rows(run.results_node)
    assert rows[0][1:] == [model_path.name, "previous model", size["rule"]]
    assert rows[1][1] == rows[1][2] == rows[1][3] == f"{test_nodes} ({size['n_positive']})"

    entries = model_registry.list_models(models, bundled_dir=None)
    assert {e.path.name for e in entries} == {"previous.pt", model_path.name} and all(e.ok for e in entries)
    model_registry.set_active_model(models, model_path)  # "Make active"
    assert json.loads((models / model_registry.ACTIVE_FILE).read_text())["path"] == model_path.name
    assert model_registry.active_model(models) == model_path


def test_cancel_during_start_up_is_clean(cohort, tmp_path):
    process = tp.TrainingProcess(cohort, tmp_path / "models", tp.TINY_OPTIONS)
    process.start()
    while not process.events:  # the worker is alive and still importing PyTorch
        process.poll()
        time.sleep(0.02)
    started = time.monotonic()
    process.cancel(wait=True, timeout=CANCEL_SECONDS)
    events = process.wait(timeout=10)
    assert time.monotonic() - started < CANCEL_SECONDS
    assert process.returncode == 130 and events[-1]["event"] == "cancelled" and "synthesized" not in events[-1]
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_bad_input_is_one_error_line_and_no_model(tmp_path, models):
    before = folder_state(models)
    process = tp.TrainingProcess(tmp_path / "no-dataset", models, {"epochs": 1})
    process.start()
    events = process.wait(timeout=60)
    assert process.returncode == 2 and events[-1]["event"] == "error"
    assert "dataset.json" in events[-1]["message"] and "\n" not in events[-1]["message"]
    assert folder_state(models) == before


@pytest.mark.skipif(os.name != "posix", reason="needs a POSIX shell script as a stand-in interpreter")
def test_a_worker_that_ignores_sigterm_is_killed_and_a_crash_is_reported(tmp_path):
    stubborn = tmp_path / "stubborn-python"
    stubborn.write_text("#!/bin/sh\ntrap '' TERM\necho '{\"event\": \"started\"}'\nsleep 60\n")
    stubborn.chmod(stubborn.stat().st_mode | stat.S_IEXEC)
    process = tp.TrainingProcess(tmp_path, tmp_path / "models", python=str(stubborn))
    process.start()
    while not process.events:
        process.poll()
        time.sleep(0.05)
    started = time.monotonic()
    process.cancel(wait=False, timeout=1.0)
    process.wait(timeout=10)
    assert time.monotonic() - started < 5 and not process.is_running
    assert process.final_event["event"] == "cancelled" and process.final_event.get("synthesized")

    crash = tmp_path / "crash-python"
    crash.write_text("#!/bin/sh\necho 'Traceback: something broke' >&2\nexit 3\n")
    crash.chmod(crash.stat().st_mode | stat.S_IEXEC)
    process = tp.TrainingProcess(tmp_path, tmp_path / "models", python=str(crash))
    process.start()
    events = process.wait(timeout=10)
    assert process.returncode == 3 and events[-1]["event"] == "error" and "something broke" in events[-1]["message"]


def test_self_test_scenario_runs_headless_with_kfold():
    """The Reload-and-Test scenario, here with k-fold: every node is tested out of fold, then a model on all nodes is exported."""
    result = tp.scenario_training_process(slicer.vtkMRMLScene(), options={"folds": 2, "inner_val_fraction": 0.5})
    assert result["epochs_run"] == 2 and result["model"].endswith(".pt") and result["progress"] == 1.0
    assert "final model on all nodes" in result["chart_title"]  # the curves show the last stage
    comparison = result["comparison"]
    assert comparison["test_set"]["nodes"] == comparison["new_model"]["n"] == comparison["size_rule"]["n"]
    assert comparison["test_set"]["split"].startswith("out-of-fold (2-fold")
    assert len(comparison["new_model"]["per_fold_auc"]) == 2
    assert result["results"][1][1] == f"{comparison['test_set']['nodes']} ({comparison['test_set']['metastatic']})"


def test_training_tab_options_match_the_training_config():
    """The Widget's training options (module constants, parameter node defaults) are TrainingConfig's."""
    import ast
    import dataclasses

    from LymphNodeClassifierLib.fusion import FUSION_MODES
    from LymphNodeClassifierLib.patches import VIEW_MODES
    from LymphNodeClassifierLib.training import ARCHITECTURE_NAMES, COMMAND_LINE_ONLY_ARCHITECTURES, COMMAND_LINE_ONLY_VIEWS, TrainingConfig

    module = ast.parse((Path(tp.MODULE_DIR) / "LymphNodeClassifier.py").read_text(encoding="utf-8"))
    # the option lists live in the panel's controller (the module file imports them from there)
    options = ast.parse((Path(tp.MODULE_DIR) / "LymphNodeClassifierLogic" / "controller.py").read_text(encoding="utf-8"))
    constants = {t.id: ast.literal_eval(n.value) for n in options.body if isinstance(n, ast.Assign)
                 for t in n.targets if isinstance(t, ast.Name) and t.id in ("TRAIN_ARCHITECTURES", "TRAIN_VIEWS", "TRAIN_FUSIONS", "TRAINING_PARAMETERS", "TRAIN_PATCHES", "TRAIN_PATCH_DEFAULT")}
    # every option except the 3-D context ones, which are the train / crossval commands' only
    assert set(constants["TRAIN_ARCHITECTURES"]) == set(ARCHITECTURE_NAMES) - set(COMMAND_LINE_ONLY_ARCHITECTURES)
    assert set(constants["TRAIN_VIEWS"]) == set(VIEW_MODES) - set(COMMAND_LINE_ONLY_VIEWS)
    assert constants["TRAIN_FUSIONS"] == list(FUSION_MODES)
    wrapper = next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "LymphNodeClassifierParameterNode")
    defaults = {item.target.id: ast.literal_eval(item.value) for item in wrapper.body
                if isinstance(item, ast.AnnAssign) and item.value is not None and item.target.id.startswith("train")}
    config = TrainingConfig()
    fields = {f.name for f in dataclasses.fields(TrainingConfig)}
    for parameter, field in constants["TRAINING_PARAMETERS"].items():
        assert field in fields, f"{parameter} maps to {field}, which is not a TrainingConfig field"
        assert defaults[parameter] == getattr(config, field), f"{parameter}'s default differs from TrainingConfig.{field}"
    assert config.split_fractions == (0.8, 0.1, 0.1) and defaults["trainSplit"] == "80/10/10"
    # the default patch is TrainingConfig's; every choice is a valid configuration with the same field of view
    assert constants["TRAIN_PATCHES"][defaults["trainPatch"]] == (config.patch_size, config.spacing_mm[0])
    assert defaults["trainPatch"] == constants["TRAIN_PATCH_DEFAULT"]
    for size, spacing in constants["TRAIN_PATCHES"].values():
        other = TrainingConfig(patch_size=size, spacing_mm=(spacing,) * 3)
        assert abs(size * spacing - config.patch_size * config.spacing_mm[0]) < 0.1, (size, spacing)
        assert other.patch_spec().size == size


# --------------------------------------------------------------------------------------------
# the Curation tab's suspect search (same process machinery)


def test_suspect_search_scenario_writes_the_list_in_the_background():
    result = tp.scenario_suspects_process()
    assert result["nodes"] > 20 and "ranked" in result["status"]


def test_suspect_search_cancel_keeps_the_previous_list(cohort, tmp_path):
    import shutil

    folder = tmp_path / "cohort"
    shutil.copytree(cohort, folder)
    previous = "rank,case_id,label_value\n1,P0001-S1,1\n"
    (folder / "suspects.csv").write_text(previous, encoding="utf-8")
    process = tp.SuspectsProcess(folder, folds=2)
    process.start()
    deadline = time.monotonic() + 60
    while not any(e.get("event") == "started" for e in process.events) and time.monotonic() < deadline:
        process.poll()
        time.sleep(0.05)
    started = time.monotonic()
    process.cancel(wait=True, timeout=30.0)  # the worker may still be importing torch: the flag waits for it
    events = process.wait(timeout=30.0)
    assert time.monotonic() - started < 30.0
    assert events[-1]["event"] == "cancelled" and not events[-1].get("synthesized"), events[-1]
    assert process.returncode == 130, "the worker stopped on its own, not killed"
    assert (folder / "suspects.csv").read_text(encoding="utf-8") == previous, "a cancelled search left the old list as it was"
    assert not (folder / "suspects.json").exists()
    assert "stopped" in process.status()


def test_suspect_worker_reports_a_missing_dataset_in_one_line(tmp_path):
    import io

    from LymphNodeClassifierLib import suspects_worker

    stream = io.StringIO()
    code = suspects_worker.main(["--dataset", str(tmp_path / "nowhere")], stream=stream)
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert code == 2 and events[0]["event"] == "started" and events[-1]["event"] == "error"
    assert "dataset.json" in events[-1]["message"] and "\n" not in events[-1]["message"]



# --------------------------------------------------------------------------------------------
# cancel through a launcher that behaves like PythonSlicer (issue 9 item 2)
#
# Inside Slicer sys.executable is PythonSlicer, a CTK launcher (commontk/AppLauncher) that runs
# python-real as a QProcess child and forwards no signal. These stand-ins run the interpreter as
# their child the same way: one ignores SIGTERM, one dies of it at once (what PythonSlicer does,
# as it installs no handler), leaving its child orphaned.

LAUNCHER = """#!{python}
import signal, subprocess, sys
child = subprocess.Popen([{python!r}, *sys.argv[1:]])  # python-real: same process group, inherited stdin/stdout
if {ignore_sigterm}:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # neither forwards SIGTERM nor obeys it
code = child.wait()
sys.exit(code if code >= 0 else 128 - code)
"""
needs_posix = pytest.mark.skipif(os.name != "posix", reason="POSIX process groups and a #! launcher script")


def launcher(folder: Path, ignore_sigterm: bool) -> str:
    path = folder / ("launcher-ignoring-sigterm" if ignore_sigterm else "launcher-dying-of-sigterm")
    path.write_text(LAUNCHER.format(python=sys.executable, ignore_sigterm=ignore_sigterm))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie waiting for its new parent to reap it is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    if status.is_file():
        try:
            text = status.read_text()
        except OSError:
            return False
        return text[text.rfind(")") + 2:].split()[0] not in ("Z", "X")
    return True


def wait_for(condition, process, seconds: float, what: str, step=None) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        (step or process.poll)()
        time.sleep(0.05)
    assert condition(), f"{what} did not happen within {seconds:.0f} s: {process.events[-3:]} {process.stderr_tail()[-500:]}"


def worker_started(process) -> bool:
    return any(e.get("event") == "started" for e in process.events)


def tree_pids(process) -> tuple[int, int]:
    """(launcher, worker interpreter): the worker reports its own pid in its `started` event."""
    launcher_pid = process.pid
    worker_pid = next(e["pid"] for e in process.events if e.get("event") == "started")
    assert worker_pid is not None and worker_pid != launcher_pid, "the worker did not run as the launcher's child"
    return launcher_pid, worker_pid


@needs_posix
@pytest.mark.parametrize("ignore_sigterm", [True, False], ids=["launcher-ignores-SIGTERM", "launcher-dies-of-SIGTERM"])
def test_cancel_through_a_launcher_stops_the_whole_tree_and_installs_no_model(cohort, models, tmp_path, ignore_sigterm):
    before = folder_state(models)
    options = {**tp.TINY_OPTIONS, "epochs": 500, "patience": 500}
    run = tp.TrainingRun(slicer.vtkMRMLScene(), cohort, models, options, python=launcher(tmp_path, ignore_sigterm))
    run.start()
    wait_for(lambda: run.curves.rows >= 1 or run.process.finished, run.process, 120, "the first epoch", step=run.step)
    assert not run.process.finished, (run.process.events[-3:], run.process.stderr_tail())
    launcher_pid, worker_pid = tree_pids(run.process)
    assert alive(launcher_pid) and alive(worker_pid)

    grace = CANCEL_SECONDS
    started = time.monotonic()
    run.cancel(wait=True, timeout=grace)
    elapsed = time.monotonic() - started
    assert not alive(worker_pid), "python-real still trains after Cancel"
    assert not alive(launcher_pid) and not run.process.is_running
    assert elapsed < grace, f"the polite stop did not reach the worker: it was killed after the {grace:.0f} s grace period"
    run.wait(timeout=10)
    assert run.outcome == "cancelled", (run.outcome, run.message)
    final = run.process.final_event
    assert final["event"] == "cancelled" and "synthesized" not in final, f"the worker did not stop by itself: {final}"
    assert "no model was written" in run.message
    time.sleep(1.0)  # a worker left running would go on to write its model
    assert folder_state(models) == before, "a cancelled run changed the model folder"


@needs_posix
def test_module_close_stops_every_worker_tree(cohort, models, tmp_path):
    """What the module does on close (and scene close): stop_all_workers leaves no process of any tree alive."""
    import shutil

    before = folder_state(models)
    folder = tmp_path / "cohort"
    shutil.copytree(cohort, folder)
    training = tp.TrainingProcess(cohort, models, {**tp.TINY_OPTIONS, "epochs": 500, "patience": 500},
                                  python=launcher(tmp_path, ignore_sigterm=False))
    search = tp.SuspectsProcess(folder, folds=2, python=launcher(tmp_path, ignore_sigterm=True))
    training.start()
    search.start()
    for process in (training, search):
        wait_for(lambda: worker_started(process), process, 60, "the worker's start")
    pids = [pid for process in (training, search) for pid in tree_pids(process)]
    assert all(alive(pid) for pid in pids)

    started = time.monotonic()
    stopped = tp.stop_all_workers(timeout=5.0)
    assert {id(p) for p in stopped} >= {id(training), id(search)}
    assert time.monotonic() - started < 5.0 + tp.KILL_WAIT_SECONDS
    assert not [pid for pid in pids if alive(pid)], "a worker process survived module close"
    for process in (training, search):
        assert process.finished and process.final_event["event"] == "cancelled"
    assert folder_state(models) == before
    assert not (folder / "suspects.csv").exists()


@needs_posix
def test_suspect_search_cancel_through_a_launcher_stops_the_whole_tree(cohort, tmp_path):
    import shutil

    folder = tmp_path / "cohort"
    shutil.copytree(cohort, folder)
    previous = "rank,case_id,label_value\n1,P0001-S1,1\n"
    (folder / "suspects.csv").write_text(previous, encoding="utf-8")
    process = tp.SuspectsProcess(folder, folds=2, python=launcher(tmp_path, ignore_sigterm=False))
    process.start()
    wait_for(lambda: any(e.get("event") == "progress" for e in process.events) or process.finished, process, 120, "the search's progress")
    launcher_pid, worker_pid = tree_pids(process)
    process.cancel(wait=True, timeout=30.0)
    assert not alive(worker_pid) and not alive(launcher_pid), "the search's python-real survived Cancel"
    events = process.wait(timeout=10)
    assert events[-1]["event"] == "cancelled" and "synthesized" not in events[-1], events[-1]
    time.sleep(1.0)
    assert (folder / "suspects.csv").read_text(encoding="utf-8") == previous and not (folder / "suspects.json").exists()


def test_a_late_cancel_is_either_a_clean_stop_or_a_finished_run(cohort, models):
    """A cancel at the very end (while the models are compared, just before the install): the run
    either stops with no model written, or it had committed and finishes with its model reported.
    Never a model after a 'cancelled', never 'done' without the model."""
    before = folder_state(models)
    run = tp.TrainingRun(slicer.vtkMRMLScene(), cohort, models, {**tp.TINY_OPTIONS, "bootstrap": 0})
    run.start()
    wait_for(lambda: any(e.get("event") == "comparing" for e in run.process.events) or run.process.finished, run.process, 180,
             "the comparison step", step=run.step)
    run.cancel(wait=True, timeout=CANCEL_SECONDS)
    run.wait(timeout=30)
    assert run.finished and not run.process.is_running
    job_model = models / f"{run.process.job_id}.pt"
    if run.outcome == "cancelled":
        assert "synthesized" not in run.process.final_event and not job_model.exists()
        assert folder_state(models) == before and run.model_path is None
    else:
        assert run.outcome == "done", (run.outcome, run.message)
        assert Path(run.model_path) == job_model and job_model.is_file()


def test_a_cancel_that_comes_before_the_commit_stops_the_run_and_one_after_it_is_ignored():
    """The install step is guarded by Cancellation.commit: a cancel is either seen there or ignored."""
    from LymphNodeClassifierLib.errors import CancelledError
    from LymphNodeClassifierLib.train_worker import Cancellation

    cancel = Cancellation()
    cancel.raise_now = False
    cancel.request()
    with pytest.raises(CancelledError):
        cancel.commit()
    assert not cancel.committed and cancel()
    late = Cancellation()
    late.raise_now = False
    late.commit()
    late.request()  # the model is being installed: too late to stop
    late.request_from_thread()
    assert late.committed and not late() and not late.requested


def test_a_cancel_line_on_stdin_requests_a_cancel():
    from LymphNodeClassifierLib.train_worker import STDIN_CANCEL_LINE, Cancellation

    for payload in (STDIN_CANCEL_LINE.encode() + b"\n", b""):  # the line, or the parent closing the pipe
        read, write = os.pipe()
        cancel = Cancellation()
        thread = cancel.watch_stdin(read)
        assert not cancel.requested
        os.write(write, b"noise\n" + payload)
        if not payload:
            os.close(write)
        thread.join(timeout=5)
        assert cancel.requested and not thread.is_alive()
        os.close(read)
        if payload:
            os.close(write)


def test_a_stopped_run_whose_model_was_already_installed_says_so(tmp_path, previous_model):
    """The parent never says 'no model was written' when the job's model is in the folder."""
    folder = tmp_path / "models"
    process = tp.TrainingProcess(tmp_path, folder, job_id="train-late")
    process._cancel_requested = True
    assert "no model was written" in process._exit_event(-9)["message"]
    model_registry.install_model(folder, previous_model, name="train-late")
    event = process._exit_event(-9)
    assert event["event"] == "cancelled" and "no model was written" not in event["message"]
    assert Path(event["model_path"]).name == "train-late.pt"
