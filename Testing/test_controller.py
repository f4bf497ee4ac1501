"""The panel's Qt-free controller on a real slicer-core scene: which node an edit lands on, what is
enabled when, the background jobs' states with a real worker process, the messages after a
classification and the intended-use text of the bundled model's card."""

import json
import os
import time
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from LymphNodeClassifierLib.curation import JOURNAL_FILE, read_journal  # noqa: E402
from LymphNodeClassifierLib.dataset import Dataset  # noqa: E402
from LymphNodeClassifierLib.errors import InputError  # noqa: E402
from LymphNodeClassifierLogic import controller as ctl  # noqa: E402
from LymphNodeClassifierLogic import training_process as tp  # noqa: E402
from LymphNodeClassifierLogic.convert import sitk_image_from_volume_node, update_volume_node_from_sitk_image  # noqa: E402
from LymphNodeClassifierLogic.logic import DEFAULT_MODEL_PATH  # noqa: E402
from test_curation_logic import dataset_folder, model_path, phantom_dataset  # noqa: E402,F401 (shared fixtures)


@pytest.fixture()
def controller(tmp_path):
    panel = ctl.PanelController(slicer.vtkMRMLScene(), models_folder=tmp_path / "models", user="tester")
    yield panel
    panel.cleanup()


def write_suspects(folder: Path, keys) -> None:
    dataset = Dataset.load(folder)
    lines = ["rank,case_id,label_value,given_label,score"]
    for rank, (case_id, value) in enumerate(keys, start=1):
        lines.append(f"{rank},{case_id},{value},{dataset.node(case_id, value).metastatic},{1.0 / rank:.3f}")
    (folder / "suspects.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def node_records(folder: Path) -> dict:
    return {(n["case_id"], n["label_value"]): n for n in json.loads((folder / "dataset.json").read_text())["nodes"]}


# ---- which node an edit applies to --------------------------------------------------------------


def test_a_suspect_click_selects_that_node_and_the_next_edit_changes_only_it(controller, dataset_folder, model_path):
    dataset = Dataset.load(dataset_folder)
    first_case, other_case = dataset.cases[0].case_id, dataset.cases[1].case_id
    target = dataset.nodes_of(other_case)[-1]
    write_suspects(dataset_folder, [(dataset.nodes_of(first_case)[0].case_id, dataset.nodes_of(first_case)[0].label_value),
                                    (target.case_id, target.label_value)])
    controller.set_model(str(model_path))
    controller.open_dataset(str(dataset_folder))
    controller.select_row(0)  # the Cases table points at the first case's first node
    assert controller.state().selected == (first_case, dataset.nodes_of(first_case)[0].label_value)

    focus = controller.select_suspect(1)  # the suspect in the other case
    state = controller.state()
    assert state.selected == (other_case, target.label_value)
    assert state.loaded_case == other_case
    assert state.selected_row == controller.curation.row_of(other_case, target.label_value) >= 0
    assert controller.curation.row_key(state.selected_row) == (other_case, target.label_value)
    assert focus is not None and len(focus) == 3  # the views are centred on the node
    loaded = controller.curation.loaded

    before = node_records(dataset_folder)
    new_label = 1 - int(target.metastatic)
    entry = controller.relabel(new_label)
    after = node_records(dataset_folder)
    changed = {key for key in before if before[key] != after[key]}
    assert changed == {(other_case, target.label_value)}
    assert after[(other_case, target.label_value)]["metastatic"] == new_label
    entries, _, _ = read_journal(dataset_folder)
    last = entries[-1]
    assert last["target"] == {"case_id": other_case, "label_value": target.label_value}
    assert (last["field"], last["old"], last["new"]) == ("metastatic", int(target.metastatic), new_label)
    assert entry["seq"] == last["seq"]
    assert (dataset_folder / JOURNAL_FILE).is_file()

    # the suspects table was refreshed by the edit (its since_ranked column) and a view re-emits the
    # same row: nothing is loaded or classified again
    suspects = controller.state().suspects_table
    assert suspects is not None and "relabelled" in suspects.GetTable().GetValueByName(1, "since_ranked").ToString()
    assert controller.select_suspect(1) is None
    assert controller.curation.loaded is loaded
    # nothing selected (a cleared selection) changes nothing either
    assert controller.select_row(-1) is None and controller.state().selected == (other_case, target.label_value)


def test_case_edits_need_a_case_and_node_edits_a_node(controller, dataset_folder):
    controller.open_dataset(str(dataset_folder))
    with pytest.raises(InputError, match="Select a node"):
        controller.relabel(1)
    case_id = Dataset.load(dataset_folder).cases[0].case_id
    controller.select(case_id)
    state = controller.state()
    assert state.enabled[ctl.EDIT_CASE] and not state.enabled[ctl.EDIT_NODE]
    with pytest.raises(InputError, match="Select a node"):
        controller.exclude_node("blurred")
    controller.exclude_case("motion")
    case = Dataset.load(dataset_folder).case(case_id)
    assert case.excluded and case.exclude_reason == "motion"
    assert controller.include_case() is not None and not Dataset.load(dataset_folder).case(case_id).excluded
    assert controller.include_case() is None and controller.state().curation_status == "Nothing changed."


# ---- enablement ------------------------------------------------------------------------------------


def test_enablement_follows_inputs_dataset_selection_and_busy_state(controller, dataset_folder, model_path):
    enabled = controller.state().enabled
    assert set(enabled) == set(ctl.ACTIONS)
    assert {name for name, on in enabled.items() if on} == {ctl.LOAD_SAMPLE, ctl.TRAINING_OPTIONS}

    controller.set_model(str(model_path))
    ct_node, labels_node = controller.load_sample_case()
    assert controller.state().enabled[ctl.CLASSIFY]
    controller.set_inputs(ct_node, None)
    assert not controller.state().enabled[ctl.CLASSIFY]
    controller.set_inputs(ct_node, labels_node)

    seen = []
    controller.add_listener(lambda state: seen.append(state))
    controller.classify(window=(-135.0, 215.0), device="cpu")
    busy = [state for state in seen if state.busy]
    assert busy, "classify never reported itself busy"
    for state in busy:  # while it runs nothing else can be pressed
        assert not any(state.enabled[name] for name in ctl.ACTIONS if name not in (ctl.TRAINING_OPTIONS,)), state.enabled
    assert not seen[-1].busy and seen[-1].enabled[ctl.CLASSIFY]

    controller.set_dataset_folder(str(dataset_folder))
    state = controller.state()
    assert state.enabled[ctl.OPEN_DATASET] and state.enabled[ctl.START_TRAINING]
    assert not state.enabled[ctl.REVIEW] and not state.enabled[ctl.LOAD_CASE]
    controller.open_dataset()
    state = controller.state()
    assert state.enabled[ctl.REVIEW] and state.enabled[ctl.FIND_SUSPECTS] and not state.enabled[ctl.EDIT_NODE]
    controller.select_row(0)
    state = controller.state()
    assert state.enabled[ctl.EDIT_NODE] and state.enabled[ctl.LOAD_CASE]
    assert not state.enabled[ctl.CANCEL_TRAINING] and not state.enabled[ctl.CANCEL_SUSPECTS]


def test_a_foreground_action_refuses_to_start_while_another_runs(controller, model_path):
    controller.set_model(str(model_path))
    ct_node, labels_node = controller.load_sample_case()
    errors = []

    def press_again(state):
        if state.busy and not errors:
            with pytest.raises(InputError, match="still running") as caught:
                controller.load_sample_case()
            errors.append(caught.value)

    controller.add_listener(press_again)
    controller.classify(device="cpu")
    assert errors and "Classifying" in str(errors[0])


# ---- messages -----------------------------------------------------------------------------------------


def test_messages_after_a_classification_with_resampled_labels(controller):
    ct_node, labels_node = controller.load_sample_case()
    assert controller.state().layers.label is labels_node  # loaded: the label map is shown
    labels = sitk_image_from_volume_node(labels_node)
    # the same masks on a coarser, anisotropic grid: the pipeline resamples them onto the CT
    coarse_spacing = [s * f for s, f in zip(labels.GetSpacing(), (1.5, 1.5, 1.0))]
    coarse_size = [int(n / f) for n, f in zip(labels.GetSize(), (1.5, 1.5, 1.0))]
    coarse = sitk.Resample(labels, coarse_size, sitk.Transform(), sitk.sitkNearestNeighbor, labels.GetOrigin(),
                           coarse_spacing, labels.GetDirection(), 0, labels.GetPixelID())
    # and one speck far too small to classify: the result warns about that node
    array = sitk.GetArrayFromImage(coarse)
    background = np.argwhere(array == 0)
    k, j, i = background[len(background) // 2]
    array[k, j, i] = 99
    speck = sitk.GetImageFromArray(array)
    speck.CopyInformation(coarse)
    coarse_node = controller.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "coarse labels")
    update_volume_node_from_sitk_image(coarse_node, speck)
    controller.set_inputs(ct_node, coarse_node)
    outputs = controller.classify(window=(-160.0, 240.0), device="cpu")  # the mediastinum preset, not the card's

    state = controller.state()
    assert outputs.result.messages, "the pipeline said nothing about resampling"
    assert state.messages[0] == f"{len(outputs.nodes)} lymph nodes classified."
    assert list(state.messages[1:]) == list(outputs.result.messages)
    assert any("resampl" in m.lower() for m in state.messages)
    assert any("-160..240" in m and "trained with" in m for m in state.messages)
    assert "DISPLAYED" in state.window_help and "card" in state.window_help
    speck_nodes = [n for n in outputs.nodes if n.label_value == 99]
    assert len(speck_nodes) == 1
    assert any(line.startswith(f"node {speck_nodes[0].node_id} (label 99): ") and "too small" in line for line in state.warnings), state.warnings
    assert len(state.warnings) == sum(len(w) for w in outputs.result.warnings)
    assert state.results_table is outputs.table_node
    assert state.layers.label is None and state.layers.background is ct_node  # the label layer is emptied
    assert state.layers.foreground is outputs.gradcam_node and state.layers.foreground_opacity > 0


def test_the_bundled_models_card_says_what_it_is_for(controller):
    assert controller.resolved_model_path("") == str(DEFAULT_MODEL_PATH)  # empty model folder: the bundled default
    text = controller.state().intended_use
    card_description = ctl.intended_use_text(None)
    assert text != card_description
    assert "never seen a real CT" in text and "not a diagnostic device" in text
    assert text.startswith("Lymph node metastasis (abdominal CT phantoms)")


def test_intended_use_follows_the_model_choice(controller, model_path, tmp_path):
    bundled = controller.state().intended_use
    controller.set_model(str(model_path))
    assert controller.state().intended_use == ctl.intended_use_text({"name": "untrained"}) != bundled
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a model")
    controller.set_model(str(broken))
    assert controller.state().intended_use.startswith("The model cannot be read")


# ---- training options ------------------------------------------------------------------------------


def test_training_options_keep_the_shift_in_millimetres_and_choose_the_split():
    parameters = {"trainArchitecture": "resnet", "trainViews": "axial", "trainMaskChannel": True, "trainEpochs": 3,
                  "trainBatchSize": 8, "trainLearningRate": 0.01, "trainFlips": False, "trainRotationDegrees": 90.0,
                  "trainTranslationPx": 10.0, "trainPatience": 2, "trainLRPatience": 1, "trainSeed": 4,
                  "trainSplit": ctl.TRAIN_SPLIT_KFOLD, "trainFolds": 3, "trainPatch": "48 px at 1.05 mm (faster on CPU)",
                  "trainFusion": "mean"}
    options = ctl.training_options(parameters)
    assert options["patch_size"] == 48 and options["spacing_mm"] == (1.054,) * 3
    assert options["translation_px"] * 1.054 == pytest.approx(10.0 * 0.79, abs=0.01)
    assert options["folds"] == 3 and "split_fractions" not in options
    assert options["architecture"] == "resnet" and options["epochs"] == 3 and options["fusion"] == "mean"
    options = ctl.training_options({**parameters, "trainSplit": ctl.TRAIN_SPLIT_FRACTIONS, "trainPatch": ctl.TRAIN_PATCH_DEFAULT})
    assert options["split_fractions"] == (0.8, 0.1, 0.1) and "folds" not in options
    assert options["translation_px"] == 10.0


# ---- background jobs ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory) -> Path:
    return tp.make_tiny_cohort(tmp_path_factory.mktemp("tiny") / "cohort")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped) counts as gone
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().split()[2] != "Z"
    except OSError:
        return False


def poll_until(controller, condition, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition(controller.state()) and time.monotonic() < deadline:
        controller.poll()
        time.sleep(0.1)
    assert condition(controller.state()), controller.state().training


def test_training_runs_then_cancels_and_installs_nothing(controller, tiny_cohort, tmp_path):
    controller.set_dataset_folder(str(tiny_cohort))
    run = controller.start_training({**tp.TINY_OPTIONS, "epochs": 200, "patience": 200, "compare_model": "none"})
    state = controller.state()
    assert state.training.phase == ctl.RUNNING and state.polling
    assert not state.enabled[ctl.START_TRAINING] and state.enabled[ctl.CANCEL_TRAINING]
    assert not state.enabled[ctl.TRAINING_OPTIONS]
    assert state.training_chart is run.curves.chart_node
    with pytest.raises(InputError, match="already running"):
        controller.start_training(tp.TINY_OPTIONS)
    poll_until(controller, lambda s: "epoch" in s.training.status.lower() or s.training.progress > 0.0)

    pid = run.process.pid
    controller.cancel_training()
    state = controller.state()
    assert state.training.phase in (ctl.CANCELLING, ctl.CANCELLED)
    assert not state.enabled[ctl.CANCEL_TRAINING] and not state.enabled[ctl.START_TRAINING]
    poll_until(controller, lambda s: not s.polling)
    state = controller.state()
    assert state.training.phase == ctl.CANCELLED, state.training
    assert state.enabled[ctl.START_TRAINING] and state.enabled[ctl.TRAINING_OPTIONS]
    assert not _alive(pid)
    models = tmp_path / "models"
    assert not list(models.glob("*.pt")) if models.is_dir() else True
    assert state.trained_model is None


def test_a_failure_after_the_worker_started_cannot_orphan_the_run(controller, tiny_cohort):
    """A front end that fails while drawing the new run (the old plot-view crash) leaves a run the controller still polls and cancels."""
    def broken_view(state):
        if state.training.phase == ctl.RUNNING:
            raise RuntimeError("plot view is not a qMRMLPlotView")

    controller.add_listener(broken_view)
    controller.set_dataset_folder(str(tiny_cohort))
    with pytest.raises(RuntimeError, match="plot view"):
        controller.start_training({**tp.TINY_OPTIONS, "epochs": 200, "patience": 200, "compare_model": "none"})
    controller.remove_listener(broken_view)
    state = controller.state()
    assert state.training.active and state.polling and state.enabled[ctl.CANCEL_TRAINING]
    pid = controller._training_run.process.pid
    assert _alive(pid)
    controller.cleanup()  # module close: cancels and waits
    assert not _alive(pid)
    assert controller.state().training.phase == ctl.CANCELLED


def test_start_training_without_a_dataset_says_what_to_do(controller, tmp_path):
    controller.set_dataset_folder(str(tmp_path / "nothing"))
    with pytest.raises(InputError, match="no dataset.json"):
        controller.start_training(tp.TINY_OPTIONS)
    assert controller.state().training.phase == ctl.IDLE and not controller.state().polling


def test_the_views_change_only_when_the_opacity_does(controller, model_path):
    controller.set_model(str(model_path))
    controller.load_sample_case()
    outputs = controller.classify(device="cpu")
    shown = controller.state().layers
    controller.set_gradcam_opacity(0.4)  # the parameter node re-sent the same value
    assert controller.state().layers is shown
    controller.set_gradcam_opacity(0.7)
    layers = controller.state().layers
    assert layers is not shown and layers.foreground_opacity == 0.7 and layers.foreground is outputs.gradcam_node
    assert layers.label is None


def test_the_suspect_search_runs_in_the_background_and_a_cancel_keeps_the_old_list(controller, dataset_folder):
    """States of the second background job (its full run is H2's scenario and the Slicer self-test's)."""
    errors = []
    controller.on_job_error = lambda message, details: errors.append(message)
    with pytest.raises(InputError, match="No dataset is open"):
        controller.start_suspect_search()
    previous = "rank,case_id,label_value\n1,P0001-S1,1\n"
    (dataset_folder / "suspects.csv").write_text(previous, encoding="utf-8")
    controller.open_dataset(str(dataset_folder))
    assert controller.state().suspects_table.GetNumberOfRows() == 1
    search = controller.start_suspect_search()
    state = controller.state()
    assert state.suspects.phase == ctl.RUNNING and state.polling
    assert not state.enabled[ctl.FIND_SUSPECTS] and state.enabled[ctl.CANCEL_SUSPECTS]
    with pytest.raises(InputError, match="already running"):
        controller.start_suspect_search()
    pid = search.pid
    controller.cancel_suspect_search()
    assert controller.state().suspects.phase in (ctl.CANCELLING, ctl.CANCELLED)
    assert not controller.state().enabled[ctl.CANCEL_SUSPECTS]
    deadline = time.monotonic() + 60
    while controller.poll() and time.monotonic() < deadline:
        time.sleep(0.1)
    state = controller.state()
    assert state.suspects.phase == ctl.CANCELLED and not errors, (state.suspects, errors)
    assert not _alive(pid)
    assert (dataset_folder / "suspects.csv").read_text(encoding="utf-8") == previous
    assert state.suspects_table.GetNumberOfRows() == 1 and state.enabled[ctl.FIND_SUSPECTS]


def test_the_report_footer_says_what_the_panel_says_about_the_model(controller, tmp_path, monkeypatch):
    """The intended-use line next to the model chooser is also the first footer line of report.png."""
    from LymphNodeClassifierLib import classify, report
    from LymphNodeClassifierLib.model import load_model
    from LymphNodeClassifierLogic.scenarios import SAMPLE_DATASET

    footers = []
    real_write_report = report.write_report

    def keep_notes(path, *args, **kwargs):
        footers.append(list(kwargs.get("notes", ())))
        return real_write_report(path, *args, **kwargs)

    monkeypatch.setattr(report, "write_report", keep_notes)
    dataset = Dataset.load(SAMPLE_DATASET)
    case = dataset.cases[0]
    classify.classify_case_files(dataset.ct_path(case), dataset.labels_path(case), tmp_path / "out",
                                 load_model(DEFAULT_MODEL_PATH, "cpu"), with_gradcam=False, note=lambda text: None)
    assert footers and footers[0][0] == controller.state().intended_use
    assert "not a diagnostic device" in footers[0][0]
    assert (tmp_path / "out" / "report.png").is_file()
