"""The panel's decisions, without Qt: one controller for the Slicer Widget and the browser review station.

Modelled on MONAI Label reviewer's `ImageDataController`: the front end (the Qt Widget in
`LymphNodeClassifier.py`, or the trame review station) only turns clicks into calls of this class and
draws `state()`. Everything the panel decides lives here: which node an edit applies to, what is
enabled when, the busy / running / cancelling states of the background jobs, which case is loaded,
which messages and warnings to show. Values in and out are plain Python values, dataclasses and
MRML nodes; there are no signals (listeners are plain callbacks) and no dialogs (a user's mistake
raises `errors.InputError`, whose one line the front end shows). Imports `slicer` and `vtk` only
through the logic modules, never `qt` or `trame`; the heavy modules (torch) are imported on first use.

Nodes are keyed by ``(case_id, label_value)``; ``label_value`` is None for a whole case.

Public API (`PanelController(scene, ...)`):

- ``state() -> PanelState``: a frozen snapshot (see the dataclass) with ``enabled[action]`` for every
  name of ``ACTIONS``; ``add_listener(callback)`` / ``remove_listener(callback)``: ``callback(state)``
  after every change; ``on_job_error``: ``callback(message, details)`` when a background job fails
  (a failed foreground action raises instead).
- Functions: ``training_options(parameters)``, ``window_fields(preset, low, high)``, ``preset_window``,
  ``intended_use_text(card)``, ``node_warning_lines(nodes, warnings)``, ``centroid_of_table_row(table_node, row)``.
- Classify tab: ``set_inputs(ct_node, labels_node)``, ``set_model(model_path)`` ("" = the active
  model; updates ``intended_use``), ``models()``, ``active_model_path()``, ``resolved_model_path()``,
  ``models_folder()``, ``models_changed()`` (models added / PyTorch installed: read the card again),
  ``load_sample_case() -> (ct_node, labels_node)``, ``classify(window, device, progress) ->
  ClassificationOutputs`` (``messages`` / ``warnings`` then hold what the result says, and
  ``layers`` the slice-view layers to show: the input label map leaves the label layer),
  ``set_gradcam_opacity(opacity)``, ``result_centroid(row)`` (a results-table click).
- Curation tab: ``set_dataset_folder(path)``, ``open_dataset(folder=None)``; selection:
  ``select(case_id, label_value)``, ``select_row(row)`` (Cases table), ``select_suspect(row)``
  (suspects table: selects that node AND loads its case), ``select_review(row)``; each returns the
  RAS point to centre the views on (or None). Selecting what is already selected does nothing, so a
  table that re-emits its selection while refreshing never reloads a case. ``load_selected_case()``;
  edits on exactly the selected node / case: ``relabel(metastatic)``, ``exclude_node(reason)``,
  ``include_node()``, ``exclude_case(reason)``, ``include_case()``, ``save_node_note(note)``,
  ``save_case_note(note)``, ``read(metastatic)`` (a reader's read, kept beside other readers'; the
  browser station's buttons) (each returns the journal entry, or None when nothing changed);
  ``review(progress)``; ``selected_info()`` (note and reason of the selected row).
- Background jobs: ``start_training(options)`` (``training_options(parameters)`` builds the options
  from the Training tab's parameters), ``cancel_training()``, ``set_show_roc(show)``,
  ``can_make_active(path)``, ``make_active(path)``, ``start_suspect_search()``,
  ``cancel_suspect_search()``; ``poll() -> bool`` reads both jobs (call it from ONE timer every
  ``POLL_INTERVAL_MS`` while ``state().polling`` is true; it returns that same value).
- ``scene_closed()`` (the curation nodes went with the scene), ``cleanup()`` (module closed: every
  running job is cancelled and waited for, the dataset is released).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

# ---- the panel's option lists (the parameter node's Choice lists; literals, so they load before torch)

WINDOW_PRESET_NAMES = ["abdomen", "mediastinum", "neck", "custom"]  # HU values: LymphNodeClassifierLib.windowing
CUSTOM_WINDOW = "custom"
DEVICE_NAMES = ["auto", "cpu", "cuda"]
# Training options of the Training tab; names and defaults are LymphNodeClassifierLib.training's
# (Testing/test_training_process.py checks that they agree).
TRAIN_ARCHITECTURES = ["custom", "resnet"]
TRAIN_VIEWS = ["triplanar", "axial"]
TRAIN_FUSIONS = ["none", "mean", "concat"]  # training.TrainingConfig.fusion (fusion.py)
# Training patch choices -> (pixels, spacing in mm); both cover the study's 64 x 0.79 = 50.6 mm field of view.
TRAIN_PATCHES = {"64 px at 0.79 mm (study)": (64, 0.79), "48 px at 1.05 mm (faster on CPU)": (48, 1.054)}
TRAIN_PATCH_DEFAULT = "64 px at 0.79 mm (study)"
TRAIN_SPLIT_FRACTIONS = "80/10/10"
TRAIN_SPLIT_KFOLD = "k-fold"
TRAIN_SPLITS = [TRAIN_SPLIT_FRACTIONS, TRAIN_SPLIT_KFOLD]
# parameter node field -> TrainingConfig field
TRAINING_PARAMETERS = {
    "trainArchitecture": "architecture",
    "trainViews": "views",
    "trainMaskChannel": "mask_channel",
    "trainFusion": "fusion",
    "trainEpochs": "epochs",
    "trainBatchSize": "batch_size",
    "trainLearningRate": "learning_rate",
    "trainFlips": "flips",
    "trainRotationDegrees": "rotation_degrees",
    "trainTranslationPx": "translation_px",
    "trainPatience": "patience",
    "trainLRPatience": "lr_patience",
    "trainSeed": "seed",
}
POLL_INTERVAL_MS = 500
# Columns of the results table (LymphNodeClassifierLogic.logic.TABLE_COLUMNS) that locate a node.
CENTROID_COLUMNS = ("centroid_R_mm", "centroid_A_mm", "centroid_S_mm")

# ---- actions whose enablement the state holds (the front end maps them to its buttons)

CLASSIFY = "classify"
LOAD_SAMPLE = "load_sample"
OPEN_DATASET = "open_dataset"
LOAD_CASE = "load_case"
EDIT_NODE = "edit_node"  # relabel, exclude / include the node, the node's note
EDIT_CASE = "edit_case"  # exclude / include the case, the case's note
REVIEW = "review"
FIND_SUSPECTS = "find_suspects"
CANCEL_SUSPECTS = "cancel_suspects"
START_TRAINING = "start_training"
CANCEL_TRAINING = "cancel_training"
TRAINING_OPTIONS = "training_options"
SHOW_ROC = "show_roc"
ACTIONS = (CLASSIFY, LOAD_SAMPLE, OPEN_DATASET, LOAD_CASE, EDIT_NODE, EDIT_CASE, REVIEW, FIND_SUSPECTS,
           CANCEL_SUSPECTS, START_TRAINING, CANCEL_TRAINING, TRAINING_OPTIONS, SHOW_ROC)

# ---- job phases

IDLE, RUNNING, CANCELLING, DONE, CANCELLED, FAILED = "idle", "running", "cancelling", "done", "cancelled", "error"

WINDOW_HELP = ("The window changes how the CT is DISPLAYED only; the model always classifies at the window "
               "it was trained with (its card's window).")

Key = tuple  # (case_id, label_value or None for the whole case)


@dataclass(frozen=True)
class JobState:
    """One background job (training or the suspect search) as the panel shows it."""

    phase: str = IDLE  # IDLE, RUNNING, CANCELLING, DONE, CANCELLED or FAILED
    status: str = ""
    progress: float = 0.0  # 0..1
    message: str = ""  # how it ended

    @property
    def active(self) -> bool:
        """The worker process may still be alive (running or being cancelled)."""
        return self.phase in (RUNNING, CANCELLING)


@dataclass(frozen=True)
class SliceLayers:
    """What the slice views show (arguments of slicer.util.setSliceViewerLayers); label None = empty layer."""

    background: Any = None
    foreground: Any = None
    foreground_opacity: float = 0.0
    label: Any = None
    fit: bool = False


@dataclass(frozen=True)
class PanelState:
    """Everything a front end draws; a new snapshot after every change."""

    busy: str = ""  # what runs in the foreground ("" when idle); every action but the cancels waits for it
    has_inputs: bool = False
    model_path: str = ""  # "" = the active model
    intended_use: str = ""  # the chosen model's card: what it is for, what it was trained on
    window_help: str = WINDOW_HELP
    messages: tuple = ()  # of the last classification or case load
    warnings: tuple = ()
    results_table: Any = None  # the last classification's table node
    layers: SliceLayers | None = None  # set by the last classification or case load
    dataset_folder: str = ""
    dataset_open: bool = False
    dataset_summary: str = ""
    cases_table: Any = None
    review_table: Any = None
    suspects_table: Any = None
    selected: Key | None = None  # the node (or case) the next edit applies to
    selected_row: int = -1  # its row in cases_table
    loaded_case: str | None = None
    curation_status: str = ""
    training: JobState = field(default_factory=JobState)
    training_chart: Any = None  # the plot chart to show: the curves, or the ROC when shown
    show_roc: bool = False  # training_chart is the finished run's test-set ROC
    training_results: Any = None
    trained_model: str | None = None  # path of the model the finished run wrote
    suspects: JobState = field(default_factory=JobState)
    enabled: Mapping[str, bool] = field(default_factory=dict)

    @property
    def polling(self) -> bool:
        """A background job needs `poll()` calls."""
        return self.training.active or self.suspects.active


def intended_use_text(card: Mapping[str, Any] | None) -> str:
    """The card's statement of what the model is for (model_registry.intended_use_text, also the report footer's)."""
    from LymphNodeClassifierLib.model_registry import intended_use_text as card_text

    return card_text(card)


def preset_window(preset: str) -> tuple[float, float]:
    """(low, high) HU of a named window preset."""
    from LymphNodeClassifierLib.windowing import WINDOW_PRESETS

    low, high = WINDOW_PRESETS[preset]
    return float(low), float(high)


def window_fields(preset: str, low: float, high: float) -> tuple[float, float, bool]:
    """The (low, high) HU a window preset shows and whether the user may edit them (only for "custom")."""
    if preset == CUSTOM_WINDOW:
        return float(low), float(high), True
    return (*preset_window(preset), False)


def _parameter(parameters, name: str):
    return parameters[name] if isinstance(parameters, Mapping) else getattr(parameters, name)


def training_options(parameters) -> dict:
    """The Training tab's parameters (a parameter node or a mapping of its field names) as train_worker options."""
    options = {config: _parameter(parameters, name) for name, config in TRAINING_PARAMETERS.items()}
    size, spacing = TRAIN_PATCHES[_parameter(parameters, "trainPatch")]
    options["patch_size"], options["spacing_mm"] = size, (spacing,) * 3
    # the shift range is set in pixels of the study's 0.79 mm patch: keep its millimetres on coarser pixels
    study_spacing = TRAIN_PATCHES[TRAIN_PATCH_DEFAULT][1]
    options["translation_px"] = round(float(_parameter(parameters, "trainTranslationPx")) * study_spacing / spacing, 2)
    if _parameter(parameters, "trainSplit") == TRAIN_SPLIT_KFOLD:
        options["folds"] = int(_parameter(parameters, "trainFolds"))
    else:
        options["split_fractions"] = (0.8, 0.1, 0.1)
    return options


def node_warning_lines(nodes, warnings) -> tuple:
    """One line per warning: ClassificationResult.warnings holds a list per node (same order as the nodes)."""
    lines = []
    for node, node_warnings in zip(nodes, warnings or []):
        for warning in [node_warnings] if isinstance(node_warnings, str) else node_warnings:
            lines.append(f"node {node.node_id} (label {node.label_value}): {warning}")
    return tuple(lines)


def centroid_of_table_row(table_node, row: int):
    """RAS centroid of the node in `row` of a results table, or None if the table has none."""
    table = table_node.GetTable() if table_node is not None else None
    if table is None or not 0 <= row < table.GetNumberOfRows():
        return None
    columns = [table.GetColumnByName(name) for name in CENTROID_COLUMNS]
    if any(column is None for column in columns):
        return None
    return tuple(float(column.GetValue(row)) for column in columns)


class PanelController:
    """The panel's state and decisions on one MRML scene (see the module docstring for the API)."""

    def __init__(self, scene, classification=None, models_folder: str | os.PathLike | None = None,
                 python: str | None = None, user: str | None = None) -> None:
        self.scene = scene
        self._classification = classification
        self._models_folder = None if models_folder is None else str(models_folder)
        self.python = python  # the workers' interpreter (None: sys.executable, PythonSlicer inside Slicer)
        self.user = user
        self._curation = None
        self._listeners: list[Callable[[PanelState], None]] = []
        self.on_job_error: Callable[[str, str], None] | None = None
        self._busy = ""
        self._ct = self._labels = None
        self._model_path = ""
        self._intended_use: str | None = None
        self._messages: tuple = ()
        self._warnings: tuple = ()
        self._results_table = None
        self._layers: SliceLayers | None = None
        self._gradcam_opacity = 0.4
        self._dataset_folder = ""
        self._selected: Key | None = None
        self._curation_status = ""
        self._training_run = None
        self._training = JobState()
        self._show_roc = False
        self._suspect_search = None
        self._suspects = JobState()

    # ---- state --------------------------------------------------------------------------------

    def add_listener(self, callback: Callable[[PanelState], None]) -> None:
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[PanelState], None]) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    def _notify(self) -> None:
        if not self._listeners:
            return
        state = self.state()
        for callback in list(self._listeners):
            callback(state)

    def _enabled(self) -> dict:
        idle = not self._busy
        curation_open = self.curation_open
        selected = self._selected if curation_open else None
        run = self._training_run
        return {
            CLASSIFY: idle and self._ct is not None and self._labels is not None,
            LOAD_SAMPLE: idle,
            OPEN_DATASET: idle and bool(self._dataset_folder.strip()),
            LOAD_CASE: idle and selected is not None,
            EDIT_NODE: idle and selected is not None and selected[1] is not None,
            EDIT_CASE: idle and selected is not None,
            REVIEW: idle and curation_open,
            FIND_SUSPECTS: idle and curation_open and not self._suspects.active,
            CANCEL_SUSPECTS: self._suspects.phase == RUNNING,
            START_TRAINING: idle and bool(self._dataset_folder.strip()) and not self._training.active,
            CANCEL_TRAINING: self._training.phase == RUNNING,
            TRAINING_OPTIONS: not self._training.active,
            SHOW_ROC: run is not None and self._training.phase == DONE and run.roc_chart_node is not None,
        }

    def state(self) -> PanelState:
        curation = self._curation if self.curation_open else None
        run = self._training_run
        chart = results = trained = None
        if run is not None:
            chart = run.roc_chart_node if self._show_roc and run.roc_chart_node is not None else run.curves.chart_node
            results, trained = run.results_node, run.model_path
        selected = self._selected if curation is not None else None
        return PanelState(
            busy=self._busy,
            has_inputs=self._ct is not None and self._labels is not None,
            model_path=self._model_path,
            intended_use=self.intended_use(),
            messages=self._messages,
            warnings=self._warnings,
            results_table=self._results_table,
            layers=self._layers,
            dataset_folder=self._dataset_folder,
            dataset_open=curation is not None,
            dataset_summary=curation.summary() if curation is not None else "",
            cases_table=curation.table_node if curation is not None else None,
            review_table=curation.review_node if curation is not None else None,
            suspects_table=curation.suspects_node if curation is not None and curation.has_suspects() else None,
            selected=selected,
            selected_row=curation.row_of(*selected) if selected is not None else -1,
            loaded_case=curation.loaded.case_id if curation is not None and curation.loaded is not None else None,
            curation_status=self._curation_status,
            training=self._training,
            training_chart=_in_scene(chart),
            show_roc=self._show_roc and run is not None and run.roc_chart_node is not None,
            training_results=_in_scene(results),
            trained_model=trained,
            suspects=self._suspects,
            enabled=self._enabled(),
        )

    def _require_idle(self) -> None:
        from LymphNodeClassifierLib.errors import InputError

        if self._busy:
            raise InputError(f"{self._busy} is still running; wait until it has finished.")

    @contextmanager
    def _running(self, what: str):
        """A foreground action: everything else is disabled until it returns (the GUI may process events meanwhile)."""
        self._require_idle()
        self._busy = what
        self._notify()
        try:
            yield
        finally:
            self._busy = ""
            self._notify()

    # ---- models ---------------------------------------------------------------------------------

    @property
    def classification(self):
        """The MRML classification logic (created on first use; it caches loaded models)."""
        if self._classification is None:
            from .logic import ClassificationLogic

            self._classification = ClassificationLogic()
        return self._classification

    def models_folder(self) -> str:
        """The user's model folder (LYMPHNODECLASSIFIER_MODELS, else the platform's user data folder)."""
        from LymphNodeClassifierLib import model_registry

        return str(model_registry.models_folder(self._models_folder))

    def models(self) -> list:
        """Bundled and trained models (model_registry.ModelEntry); unreadable files carry their error."""
        from LymphNodeClassifierLib import model_registry

        return model_registry.list_models(self.models_folder())

    def active_model_path(self) -> str:
        """The model used when none is chosen: the active one, else the bundled default ("" if none)."""
        from LymphNodeClassifierLib import model_registry

        path = model_registry.resolve_model(self.models_folder())
        return str(path) if path is not None else ""

    def resolved_model_path(self, model_path: str | None = None) -> str | None:
        """`model_path` ("" = the active model; None = the chosen one) as a file (None: the logic's default)."""
        path = self._model_path if model_path is None else model_path
        return path or self.active_model_path() or None

    def set_model(self, model_path: str) -> None:
        """Choose the model ("" = the active model); its card's intended use is read on the next state()."""
        model_path = str(model_path or "")
        if model_path != self._model_path:
            self._model_path = model_path
            self._intended_use = None
            self._notify()

    def intended_use(self) -> str:
        """What the chosen model's card says it is for (read once per model choice)."""
        if self._intended_use is None:
            from LymphNodeClassifierLib import model_registry

            path = self.resolved_model_path()
            if path is None:
                self._intended_use = "No model is available: install one on the Training tab or choose a model file."
            else:
                entry = model_registry.read_entry(path)
                self._intended_use = intended_use_text(entry.card) if entry.ok else f"The model cannot be read: {entry.error}"
        return self._intended_use

    def models_changed(self) -> None:
        """Models were added, made active or PyTorch was installed: read the chosen model's card again."""
        self._intended_use = None
        self._notify()

    def can_make_active(self, path: str | None) -> bool:
        return bool(path) and os.path.abspath(str(path)) != os.path.abspath(self.active_model_path() or "")

    def make_active(self, path: str) -> None:
        from LymphNodeClassifierLib import model_registry

        model_registry.set_active_model(self.models_folder(), path)
        self.models_changed()

    # ---- Classify tab ---------------------------------------------------------------------------

    def set_inputs(self, ct_node, labels_node) -> None:
        if (ct_node, labels_node) != (self._ct, self._labels):
            self._ct, self._labels = ct_node, labels_node
            self._notify()

    def set_gradcam_opacity(self, opacity: float) -> None:
        if float(opacity) == self._gradcam_opacity:
            return  # the views keep whatever the user set meanwhile
        self._gradcam_opacity = float(opacity)
        if self._layers is not None and self._layers.foreground is not None:
            self._layers = SliceLayers(self._layers.background, self._layers.foreground, self._gradcam_opacity,
                                       self._layers.label)
            self._notify()

    def load_sample_case(self):
        """Load the first case of the bundled sample dataset; returns (CT node, label map node)."""
        from .scenarios import load_sample_case

        with self._running("Loading the sample case"):
            _, _, ct_node, labels_node = load_sample_case(self.scene)
        self._layers = SliceLayers(background=ct_node, label=labels_node, fit=True)
        self.set_inputs(ct_node, labels_node)
        return ct_node, labels_node

    def classify(self, window: tuple[float, float] | None = None, device: str = "auto", progress=None):
        """Classify the selected inputs with the chosen model; returns logic.ClassificationOutputs."""
        from LymphNodeClassifierLib.errors import InputError

        if self._ct is None or self._labels is None:
            raise InputError("Select a CT volume and the label map or segmentation of its lymph nodes first.")
        with self._running("Classifying"):
            outputs = self.classification.classify(self._ct, self._labels, model_path=self.resolved_model_path(),
                                                   window=window, device=device, gradcam=True, progress=progress)
        self._show_outputs(outputs, self._ct)
        return outputs

    def _show_outputs(self, outputs, ct_node) -> None:
        result = outputs.result
        count = len(outputs.nodes)
        self._messages = (f"{count} lymph node{'s' if count != 1 else ''} classified.",
                          *[str(m) for m in getattr(result, "messages", []) or []])
        self._warnings = node_warning_lines(outputs.nodes, getattr(result, "warnings", None))
        self._results_table = outputs.table_node
        gradcam = outputs.gradcam_node
        # the probability-coloured segments replace the input label map in the views
        self._layers = SliceLayers(background=ct_node, foreground=gradcam,
                                   foreground_opacity=self._gradcam_opacity if gradcam is not None else 0.0, label=None)
        self._notify()

    def result_centroid(self, row: int):
        """RAS centroid of a row of the results table (None if none)."""
        return centroid_of_table_row(self._results_table, row)

    # ---- Curation tab: dataset and selection --------------------------------------------------------

    @property
    def curation(self):
        """The curation logic (created on first use, on this controller's scene)."""
        if self._curation is None:
            from .curation_logic import CurationLogic

            self._curation = CurationLogic(self.scene, classification=self.classification, user=self.user)
        return self._curation

    @property
    def curation_open(self) -> bool:
        return self._curation is not None and self._curation.is_open

    def set_dataset_folder(self, folder: str) -> None:
        folder = str(folder or "")
        if folder != self._dataset_folder:
            self._dataset_folder = folder
            self._notify()

    def open_dataset(self, folder: str | None = None):
        """Open the dataset folder for curation; returns the table node of its nodes."""
        if folder is not None:
            self._dataset_folder = str(folder)
        with self._running("Opening the dataset"):
            table = self.curation.open_dataset(self._dataset_folder)
            self.curation.suspects_table()  # read suspects.csv when there is one
        self._selected = None
        self._curation_status = ""
        self._notify()
        return table

    def _focus(self, key: Key | None):
        """RAS point of a node of the loaded case, or None (a case key, or a node that is not in the mask)."""
        if key is None or key[1] is None:
            return None
        return self.curation.node_centroid_ras(*key)

    def select(self, case_id: str, label_value: int | None = None):
        """Make (case_id, label_value) the target of the next edit; returns where to centre the views (or None)."""
        key = (str(case_id), None if label_value is None else int(label_value))
        if key == self._selected:
            return None
        self._selected = key
        self._notify()
        loaded = self._curation.loaded if self._curation is not None else None
        return self._focus(key) if loaded is not None and loaded.case_id == key[0] else None

    def select_row(self, row: int):
        """A click in the Cases table (row in the table node's order; -1 = nothing, which changes nothing)."""
        key = self.curation.row_key(row) if self.curation_open else None
        return None if key is None else self.select(*key)

    def select_review(self, row: int):
        """A click in the review list: select the problem's node (or its case)."""
        key = self.curation.review_key(row) if self.curation_open else None
        if key is None:
            return None
        if key[1] is not None and self.curation.row_of(*key) < 0:
            key = (key[0], None)
        return self.select(*key)

    def select_suspect(self, row: int):
        """A click in the suspects table: select that node, load its case (if not loaded) and return its centroid."""
        key = self.curation.suspect_key(row) if self.curation_open else None
        if key is None or key == self._selected:
            return None  # a refresh re-emitting the same selection loads nothing
        self._selected = key
        loaded = self.curation.loaded
        if loaded is None or loaded.case_id != key[0]:
            self.load_selected_case()
        else:
            self._notify()
        return self._focus(key)

    def selected_info(self) -> dict | None:
        """The selected row's values (note, reason, ...; see curation_logic.NODE_COLUMNS), or None."""
        if self._selected is None or not self.curation_open:
            return None
        return self.curation.row_info(self.curation.row_of(*self._selected))

    def load_selected_case(self):
        """Load and classify the selected case; returns curation_logic.LoadedCase."""
        from LymphNodeClassifierLib.errors import InputError

        if self._selected is None or not self.curation_open:
            raise InputError("Select a case or a node in the Cases table first.")
        case_id = self._selected[0]
        with self._running("Loading the case"):
            loaded = self.curation.load_case(case_id, model_path=self.resolved_model_path())
        outputs = loaded.outputs
        if outputs is not None:
            self._show_outputs(outputs, loaded.ct_node)
        else:
            self._messages, self._warnings = (), ()
            self._layers = SliceLayers(background=loaded.ct_node, label=loaded.labels_node, fit=True)
        if outputs is not None:
            self._layers = SliceLayers(self._layers.background, self._layers.foreground, self._layers.foreground_opacity,
                                       None, fit=True)
        self._curation_status = loaded.message or f"Case {case_id} loaded."
        self._notify()
        return loaded

    # ---- Curation tab: edits (always on the selected node or case) ---------------------------------

    def _edit(self, needs_node: bool, action: Callable[[str, Any], Any]):
        from LymphNodeClassifierLib.errors import InputError

        key = self._selected if self.curation_open else None
        if key is None or (needs_node and key[1] is None):
            raise InputError("Select a node in the Cases table (or the suspects list) first." if needs_node
                             else "Select a case in the Cases table first.")
        self._require_idle()
        entry = action(*key)
        self._curation_status = "Saved." if entry is not None else "Nothing changed."
        if entry is not None and self.curation.has_suspects():
            try:
                self.curation.suspects_table()  # its since_ranked column shows the edit (same node, refreshed)
            except InputError as error:
                self._curation_status = f"Saved; the suspect list could not be refreshed: {error}"
        self._notify()
        return entry

    def relabel(self, metastatic: int | None):
        """1 metastatic, 0 benign, None not labelled; on the selected node."""
        return self._edit(True, lambda case_id, value: self.curation.set_label(case_id, value, metastatic))

    def read(self, metastatic: int | None):
        """The user's read of the selected node (1, 0; None withdraws it): kept beside other readers'
        reads, the label follows them (curation.read_node); `relabel` is the adjudication."""
        return self._edit(True, lambda case_id, value: self.curation.read_node(case_id, value, metastatic))

    def exclude_node(self, reason: str):
        return self._edit(True, lambda case_id, value: self.curation.exclude_node(case_id, value, reason))

    def include_node(self):
        return self._edit(True, lambda case_id, value: self.curation.include_node(case_id, value))

    def save_node_note(self, note: str):
        return self._edit(True, lambda case_id, value: self.curation.set_node_note(case_id, value, note))

    def exclude_case(self, reason: str):
        return self._edit(False, lambda case_id, value: self.curation.exclude_case(case_id, reason))

    def include_case(self):
        return self._edit(False, lambda case_id, value: self.curation.include_case(case_id))

    def save_case_note(self, note: str):
        return self._edit(False, lambda case_id, value: self.curation.set_case_note(case_id, note))

    def review(self, progress: Callable[[int, int], None] | None = None):
        """Run the automatic checks; returns the review table node."""
        with self._running("Checking the dataset"):
            node = self.curation.review(progress=progress)
        self._curation_status = f"{node.GetNumberOfRows()} problems found."
        self._notify()
        return node

    # ---- background jobs ----------------------------------------------------------------------------

    def start_training(self, options: Mapping[str, Any]):
        """Start a training run on the dataset folder in a background process; returns the TrainingRun."""
        from LymphNodeClassifierLib.errors import InputError

        from .training_process import TrainingRun

        if self._training.active:
            raise InputError("A training run is already running; wait for it or cancel it.")
        self._require_idle()
        folder = self._dataset_folder
        if not folder or not os.path.isfile(os.path.join(folder, "dataset.json")):
            raise InputError(f"There is no dataset.json in '{folder}'; choose a dataset folder on the Curation tab first.")
        self._remove_run_nodes(self._training_run)
        run = TrainingRun(self.scene, folder, self.models_folder(), dict(options), python=self.python)
        # Held before it starts: whatever fails later, poll() keeps watching the worker and cancel() reaches it.
        self._training_run, self._show_roc = run, False
        self._launch("_training", run, "The training process could not be started.")
        self._training = JobState(RUNNING, run.status, run.progress)
        self._notify()
        return run

    def _launch(self, job: str, worker, failed: str) -> None:
        """Start a worker whose JobState is the attribute `job`; a failed start leaves FAILED (not active)."""
        setattr(self, job, JobState(RUNNING, "Starting..."))
        try:
            worker.start()
        except Exception:
            setattr(self, job, JobState(FAILED, failed))
            self._notify()
            raise

    def _remove_run_nodes(self, run) -> None:
        if run is None:
            return
        for node in run.curves.nodes() + [run.results_node] + list(run.roc_nodes):
            if node is not None and node.GetScene() is self.scene:
                self.scene.RemoveNode(node)

    def cancel_training(self, wait: bool = False, timeout: float = 10.0) -> None:
        run = self._training_run
        if run is None or not self._training.active:
            return
        run.cancel(wait=wait, timeout=timeout)
        if not run.finished:
            self._training = JobState(CANCELLING, run.status or "Cancelling...", run.progress)
        self._update_training(notify_errors=False)
        self._notify()

    def set_show_roc(self, show: bool) -> None:
        if bool(show) != self._show_roc:
            self._show_roc = bool(show)
            self._notify()

    def start_suspect_search(self):
        """Rank the open dataset's labels in a background process; the list appears when it is done."""
        from LymphNodeClassifierLib.errors import InputError

        from .training_process import SuspectsProcess

        if not self.curation_open:
            raise InputError("No dataset is open; open a dataset folder on the Curation tab first.")
        if self._suspects.active:
            raise InputError("The suspect search is already running; wait for it or cancel it.")
        kwargs = {} if self.python is None else {"python": self.python}
        search = SuspectsProcess(self.curation.session.folder, **kwargs)  # the dataset shown, not the path box's text
        self._suspect_search = search
        self._launch("_suspects", search, "The suspect search could not be started.")
        self._suspects = JobState(RUNNING, search.status())
        self._notify()
        return search

    def cancel_suspect_search(self, wait: bool = False, timeout: float = 10.0) -> None:
        search = self._suspect_search
        if search is None or not self._suspects.active:
            return
        search.cancel(wait=wait, timeout=timeout)
        self._suspects = JobState(CANCELLING, search.status())
        self._update_suspects(notify_errors=False)
        self._notify()

    def poll(self) -> bool:
        """Read both background jobs; True while one of them still needs polling."""
        if self._training.active:
            self._update_training()
        if self._suspects.active:
            self._update_suspects()
        self._notify()
        return self._training.active or self._suspects.active

    def _job_error(self, message: str, details: str) -> None:
        if self.on_job_error is not None:
            self.on_job_error(message, details)

    def _update_training(self, notify_errors: bool = True) -> None:
        run = self._training_run
        if run is None:
            return
        try:
            run.step()
        except Exception as error:  # a broken event stream: stop the worker rather than leave it unwatched
            import traceback

            run.cancel(wait=True, timeout=5.0)
            self._training = JobState(FAILED, f"Failed: {error}", run.progress, str(error))
            if notify_errors:
                self._job_error(f"Reading the training process failed: {error}", traceback.format_exc())
            return
        if not run.finished:
            phase = CANCELLING if run.process.cancel_requested else RUNNING
            self._training = JobState(phase, run.status, run.progress)
            return
        phase = {"done": DONE, "cancelled": CANCELLED, "error": FAILED}.get(run.outcome, FAILED)
        self._training = JobState(phase, run.status, run.progress, run.message)
        if phase == DONE:
            self._show_roc = run.roc_chart_node is not None  # the ROC answers "is the new model better?"
            self.models_changed()
        elif phase == FAILED and notify_errors:
            self._job_error(f"Training failed: {run.message}", run.process.stderr_tail())

    def _update_suspects(self, notify_errors: bool = True) -> None:
        search = self._suspect_search
        if search is None:
            return
        search.poll()
        if not search.finished:
            self._suspects = JobState(CANCELLING if search.cancel_requested else RUNNING, search.status())
            return
        event = search.final_event or {}
        kind = event.get("event")
        phase = {"done": DONE, "cancelled": CANCELLED, "error": FAILED}.get(kind, FAILED)
        self._suspects = JobState(phase, search.status(), 1.0 if phase == DONE else 0.0, str(event.get("message", "")))
        if phase == DONE and self.curation_open:
            self.curation.suspects_table()
        elif phase == FAILED and notify_errors:
            self._job_error(f"The suspect search failed: {event.get('message', '')}", search.stderr_tail())

    # ---- scene and module life ------------------------------------------------------------------------

    def scene_closed(self) -> None:
        """The scene was closed: the curation and training nodes went with it; the dataset is released."""
        if self._curation is not None:
            self._curation.cleanup()
        self._selected = None
        self._results_table, self._layers = None, None
        self._ct = self._labels = None
        self._messages, self._warnings = (), ()
        self._show_roc = False
        self._notify()

    def cleanup(self) -> None:
        """The module is closing: cancel and wait for every worker, release the dataset."""
        if self._training_run is not None and not self._training_run.finished:
            self._training_run.cancel(wait=True, timeout=5.0)  # never leave a worker running
            self._update_training(notify_errors=False)
        if self._suspect_search is not None and not self._suspect_search.finished:
            self._suspect_search.cancel(wait=True, timeout=5.0)
            self._update_suspects(notify_errors=False)
        if self._curation is not None:
            self._curation.cleanup()
        self._listeners.clear()


def _in_scene(node):
    return node if node is not None and node.GetScene() is not None else None
