"""Training in a background process on a real slicer-core scene with a real worker subprocess:
events stream into the curve table, cancel stops the worker within seconds and leaves no model,
a finished run installs a model whose card loads and compares it with the active model and the
size rule on the same test nodes; make-active switches active_model.json."""

import json
import math
import os
import stat
import time
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

from LymphNodeClassifierLib import model_registry  # noqa: E402
from LymphNodeClassifierLib.model import load_model  # noqa: E402
from LymphNodeClassifierLib.train_worker import options_to_argv  # noqa: E402
from LymphNodeClassifierLogic import training_process as tp  # noqa: E402
from helpers import export_untrained_model  # noqa: E402

CANCEL_SECONDS = 5.0


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
    assert [r[0] for r in rows] == ["model", "test nodes (metastatic)", "ACC", "AUC", "Sensitivity", "Specificity", "PPV", "NPV", tp.CONFUSION_ROW]
    assert rows[-1] == [tp.CONFUSION_ROW, "3 / 1 / 2 / 4", "", "3 / 1 / 2 / 4"]
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
    run.cancel(wait=True, timeout=10.0)
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
    process.cancel(wait=True, timeout=10.0)
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

    from LymphNodeClassifierLib.patches import VIEW_MODES
    from LymphNodeClassifierLib.training import ARCHITECTURE_NAMES, TrainingConfig

    module = ast.parse((Path(tp.MODULE_DIR) / "LymphNodeClassifier.py").read_text(encoding="utf-8"))
    constants = {t.id: ast.literal_eval(n.value) for n in module.body if isinstance(n, ast.Assign)
                 for t in n.targets if isinstance(t, ast.Name) and t.id in ("TRAIN_ARCHITECTURES", "TRAIN_VIEWS", "TRAINING_PARAMETERS", "TRAIN_PATCHES", "TRAIN_PATCH_DEFAULT")}
    assert set(constants["TRAIN_ARCHITECTURES"]) == set(ARCHITECTURE_NAMES)
    assert set(constants["TRAIN_VIEWS"]) == set(VIEW_MODES)
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
