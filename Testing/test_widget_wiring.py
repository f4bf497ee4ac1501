"""The module's Widget driven headless: its real code, the real controller, a real MRML scene (slicer-core),
and stand-ins for the Qt widgets that the .ui declares (Qt itself cannot run here).

The stand-ins are built from the .ui (one per <widget>, so a name the Widget uses that the .ui lacks
fails here) and behave as Slicer's source says the real ones do where it matters: a disabled
button ignores click(); qMRMLTableView.setMRMLTableNode emits selectionChanged()
(Libs/MRML/Widgets/qMRMLTableView.cxx, setMRMLTableNode: `emit selectionChanged();`); selectRow
moves the current index, then emits. What this checks is the wiring: clicks reach the controller,
its state reaches the widgets, a suspect click selects that node for the next edit, and a refresh
of the suspects table never loads the case again.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import sys
import types
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
import vtk  # noqa: E402

from LymphNodeClassifierLib.curation import read_journal  # noqa: E402
from LymphNodeClassifierLib.dataset import Dataset  # noqa: E402
from LymphNodeClassifierLogic import controller as ctl  # noqa: E402
from LymphNodeClassifierLogic import training_process as tp  # noqa: E402
from test_curation_logic import model_path, phantom_dataset  # noqa: E402,F401 (shared fixtures)

MODULE_DIR = Path(__file__).resolve().parents[1] / "LymphNodeClassifier"
UI_PATH = MODULE_DIR / "Resources" / "UI" / "LymphNodeClassifier.ui"


# ---- stand-ins for Qt widgets -----------------------------------------------------------------------


def _call_slot(slot, args) -> None:
    """PythonQt passes a signal's arguments to a Python slot only as far as it takes them (the template's
    `connect("clicked(bool)", self.onApplyButton)` with `def onApplyButton(self)`)."""
    import inspect

    try:
        parameters = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        slot(*args)
        return
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        slot(*args)
        return
    slot(*args[:len([p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])])


class Widget:
    def __init__(self, name: str, cls: str) -> None:
        self.objectName, self.className = name, cls
        self.enabled = True
        self.visible = True
        self.text = ""
        self.toolTip = ""
        self.checked = False
        self.collapsed = False
        self.value = 0
        self.format = "%p%"
        self._slots: dict[str, list] = {}

    def connect(self, signal: str, slot) -> None:
        self._slots.setdefault(signal, []).append(slot)

    def emit(self, signal: str, *args) -> None:
        for slot in self._slots.get(signal, []):
            _call_slot(slot, args)

    def show(self) -> None:
        self.visible = True

    def hide(self) -> None:
        self.visible = False

    def click(self) -> None:
        if self.enabled:  # QAbstractButton::click does nothing on a disabled button
            self.emit("clicked(bool)", False)

    def setMRMLScene(self, scene) -> None:
        self.scene = scene


class CheckBox(Widget):
    def __setattr__(self, name, value):
        old = self.__dict__.get(name)
        super().__setattr__(name, value)
        if name == "checked" and "_slots" in self.__dict__ and old != value:
            self.emit("toggled(bool)", value)


class ComboBox(Widget):
    def __init__(self, name, cls):
        super().__init__(name, cls)
        self.items: list[list] = []
        self._index = -1

    @property
    def count(self):
        return len(self.items)

    @property
    def currentIndex(self):
        return self._index

    @currentIndex.setter
    def currentIndex(self, index):
        if index != self._index:
            self._index = index
            self.emit("currentIndexChanged(int)", index)

    @property
    def currentData(self):
        return self.items[self._index][1] if 0 <= self._index < len(self.items) else None

    def clear(self):
        self.items, self._index = [], -1

    def addItem(self, text, data=None):
        self.items.append([text, data])
        if self._index < 0:
            self._index = 0

    def itemData(self, index):
        return self.items[index][1]

    def setItemData(self, index, value, role):
        pass

    def findData(self, data):
        return next((i for i, item in enumerate(self.items) if item[1] == data), -1)

    def findText(self, text):
        return next((i for i, item in enumerate(self.items) if item[0] == text), -1)


class PathLineEdit(Widget):
    def __init__(self, name, cls):
        super().__init__(name, cls)
        self._path = ""

    @property
    def currentPath(self):
        return self._path

    @currentPath.setter
    def currentPath(self, path):
        if path != self._path:
            self._path = path
            self.emit("currentPathChanged(QString)", path)

    def addCurrentPathToHistory(self):
        pass


class Index:
    def __init__(self, row):
        self._row = row

    def isValid(self):
        return self._row >= 0

    def row(self):
        return self._row


class Proxy:
    """The unsorted view: proxy rows are source rows."""

    def mapToSource(self, index):
        return index

    def mapFromSource(self, index):
        return index

    def sourceModel(self):
        return self

    def index(self, row, column):
        return Index(row)


class TableView(Widget):
    def __init__(self, name, cls):
        super().__init__(name, cls)
        self._node = None
        self._current = Index(-1)
        self.selection_signals = 0

    def mrmlTableNode(self):
        return self._node

    def setMRMLTableNode(self, node):
        if node is not self._node:  # the same node keeps its rows and the selection
            self._current = Index(-1)
        self._node = node
        self.emit("selectionChanged()")  # as qMRMLTableView::setMRMLTableNode does, even for the same node

    def selectionModel(self):
        return types.SimpleNamespace(currentIndex=lambda: self._current)

    def sortFilterProxyModel(self):
        return Proxy()

    def selectRow(self, row):
        self._current = Index(row)
        self.emit("selectionChanged()")

    def emit(self, signal, *args):
        if signal == "selectionChanged()":
            self.selection_signals += 1
        super().emit(signal, *args)


class PlotWidget(Widget):
    def setMRMLPlotViewNode(self, node):
        self.plot_view_node = node

    def plotView(self):
        return self


WIDGET_TYPES = {"QComboBox": ComboBox, "ctkPathLineEdit": PathLineEdit, "qMRMLTableView": TableView,
                "qMRMLPlotWidget": PlotWidget, "QCheckBox": CheckBox}


def ui_from_file():
    root = ET.parse(UI_PATH).getroot()
    widgets = {w.get("name"): WIDGET_TYPES.get(w.get("class"), Widget)(w.get("name"), w.get("class")) for w in root.iter("widget")}
    return types.SimpleNamespace(**widgets), widgets["LymphNodeClassifier"]


class Timer:
    def __init__(self):
        self._active, self._slots = False, []

    def setInterval(self, ms):
        self.interval = ms

    def connect(self, signal, slot):
        self._slots.append(slot)

    def start(self):
        self._active = True

    def stop(self):
        self._active = False

    def isActive(self):
        return self._active

    def fire(self):
        for slot in self._slots:
            _call_slot(slot, ())


# ---- stand-ins for the Slicer application layer (not MRML: the scene and nodes are real) -----------


class ParameterNode:
    """What @parameterNodeWrapper gives: typed attributes on a real MRML node (its Modified events are real)."""

    def __init__(self, defaults, node):
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_values", dict(defaults))
        object.__setattr__(self, "parameterNode", node)  # the wrapper's underlying MRML node

    def __getattr__(self, name):
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        return getattr(object.__getattribute__(self, "_node"), name)

    def __setattr__(self, name, value):
        self._values[name] = value
        self._node.Modified()

    def __hash__(self):
        return id(self)

    def connectGui(self, ui):
        return "tag"

    def disconnectGui(self, tag):
        pass


def parameter_node_wrapper(cls):
    defaults = {name: getattr(cls, name, None) for name in cls.__annotations__}

    def make(node):
        return ParameterNode(defaults, node)

    return make


class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        self._node = None

    def getParameterNode(self):
        if self._node is None:
            self._node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
        return self._node


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        self.parent = types.SimpleNamespace(isEntered=True)

    def setup(self):
        self.layout = types.SimpleNamespace(addWidget=lambda widget: None)

    def resourcePath(self, filename):
        return str(MODULE_DIR / "Resources" / filename)


@pytest.fixture()
def widget(tmp_path, monkeypatch):
    """The module's Widget after setup(), on a fresh real scene."""
    scene = slicer.vtkMRMLScene()
    jumps, errors = [], []
    ui, root = ui_from_file()
    qt = types.ModuleType("qt")
    qt.QTimer = Timer
    qt.Qt = types.SimpleNamespace(ToolTipRole=3, WaitCursor=16)
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    slm.ScriptedLoadableModule = type("ScriptedLoadableModule", (), {"__init__": lambda self, parent: setattr(self, "parent", parent)})
    slm.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    slm.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    slm.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (unittest.TestCase,), {"delayDisplay": lambda self, message: None})
    slm.__all__ = list(vars(slm).keys() - {"__name__", "__doc__"})
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = parameter_node_wrapper
    wrapper.Choice = lambda values: ("Choice", tuple(values))
    wrapper.WithinRange = lambda low, high: ("WithinRange", low, high)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    for name, module in (("qt", qt), ("slicer.ScriptedLoadableModule", slm), ("slicer.parameterNodeWrapper", wrapper),
                         ("slicer.i18n", i18n)):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    # one slice view's composite node, as the layout manager's Red view has (real MRML: setSliceViewerLayers sets it)
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    composite.SetSingletonTag("vtkMRMLSliceNodeRed")
    red = types.SimpleNamespace(mrmlSliceCompositeNode=lambda: scene.GetSingletonNode("vtkMRMLSliceNodeRed", "vtkMRMLSliceCompositeNode"))
    layout_manager = types.SimpleNamespace(sliceWidget=lambda name: red, mrmlSliceLogics=vtk.vtkCollection)
    timers = []  # processEvents runs a due timer, as Qt's event loop does

    def process_events():
        for timer in timers:
            if timer.isActive():
                timer.fire()

    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(processEvents=process_events, testingEnabled=lambda: True,
                                                            connect=lambda *a: None, layoutManager=lambda: layout_manager), raising=False)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(markups=types.SimpleNamespace(
        logic=lambda: types.SimpleNamespace(JumpSlicesToLocation=lambda x, y, z, centered: jumps.append((x, y, z))))), raising=False)
    monkeypatch.setattr(slicer.util, "selectModule", lambda name: None)
    monkeypatch.setattr(slicer.util, "loadUI", lambda path: root)
    monkeypatch.setattr(slicer.util, "childWidgetVariables", lambda widget: ui)
    monkeypatch.setattr(slicer.util, "WaitCursor", contextlib.nullcontext)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kwargs: errors.append(text))
    monkeypatch.setenv("LYMPHNODECLASSIFIER_MODELS", str(tmp_path / "models"))
    spec = importlib.util.spec_from_file_location("LymphNodeClassifierModuleFile", MODULE_DIR / "LymphNodeClassifier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    panel = module.LymphNodeClassifierWidget()
    panel.ensurePythonDependencies = lambda: True  # this venv has them; Slicer's installer is not here
    panel.setup()
    timers.append(panel._pollTimer)
    panel.jumps, panel.errors, panel.scene, panel.module = jumps, errors, scene, module
    slicer.modules.lymphnodeclassifier = types.SimpleNamespace(widgetRepresentation=lambda: types.SimpleNamespace(self=lambda: panel))
    yield panel
    panel.cleanup()


def test_classify_button_fills_the_panel_and_empties_the_label_layer(widget):
    ui = widget.ui
    assert not ui.classifyButton.enabled and "Select a CT" in ui.classifyButton.toolTip
    assert "not a diagnostic device" in ui.intendedUseLabel.text  # the bundled model's card, next to the chooser
    ui.loadSampleCaseButton.click()
    assert ui.classifyButton.enabled
    layers = []
    original = slicer.util.setSliceViewerLayers
    slicer.util.setSliceViewerLayers = lambda **kwargs: layers.append(kwargs)
    try:
        ui.classifyButton.click()
    finally:
        slicer.util.setSliceViewerLayers = original
    assert not widget.errors, widget.errors
    parameters = widget._parameterNode
    table = ui.resultsTableView.mrmlTableNode()
    assert table is parameters.outputTable and table.GetNumberOfRows() == len(parameters.outputSegmentation.GetSegmentation().GetSegmentIDs())
    assert ui.resultsSummaryLabel.text.startswith(f"{table.GetNumberOfRows()} lymph nodes classified.")
    assert layers[-1]["label"] is None and layers[-1]["foreground"] is parameters.outputGradCam
    assert ui.resultsCollapsibleButton.enabled and ui.gradcamOpacitySliderWidget.enabled
    assert not ui.progressBar.visible
    ui.resultsTableView.selectRow(0)
    assert len(widget.jumps) == 1


def test_a_suspect_click_then_metastatic_relabels_that_node_without_reloading(widget, phantom_dataset, tmp_path, model_path):
    folder = tmp_path / "dataset"
    shutil.copytree(phantom_dataset, folder)
    dataset = Dataset.load(folder)
    other = dataset.cases[1].case_id
    target = dataset.nodes_of(other)[0]
    first = dataset.nodes_of(dataset.cases[0].case_id)[0]
    (folder / "suspects.csv").write_text(
        "rank,case_id,label_value,given_label\n"
        f"1,{first.case_id},{first.label_value},{first.metastatic}\n2,{target.case_id},{target.label_value},{target.metastatic}\n",
        encoding="utf-8")
    ui = widget.ui
    widget._parameterNode.modelPath = str(model_path)
    ui.datasetFolderPathLineEdit.currentPath = str(folder)
    assert ui.openDatasetButton.enabled and not ui.markMetastaticButton.enabled
    ui.openDatasetButton.click()
    assert ui.curationTableView.mrmlTableNode() is not None and ui.suspectsCollapsibleButton.visible
    ui.curationTableView.selectRow(0)  # the Cases table points elsewhere
    assert widget.controller.state().selected == (first.case_id, first.label_value)

    loads = []
    original = widget.controller.curation.load_case
    widget.controller.curation.load_case = lambda *a, **k: loads.append(a) or original(*a, **k)
    ui.suspectsTableView.selectRow(1)
    assert widget.controller.state().selected == (other, target.label_value) and len(loads) == 1
    row = widget.controller.curation.row_of(other, target.label_value)
    assert ui.curationTableView.selectionModel().currentIndex().row() == row  # the Cases table follows the click
    assert widget.jumps, "the views were not centred on the suspect"

    new_label = 1 - int(target.metastatic)
    (ui.markMetastaticButton if new_label == 1 else ui.markBenignButton).click()
    assert not widget.errors, widget.errors
    last = read_journal(folder)[0][-1]
    assert last["target"] == {"case_id": other, "label_value": target.label_value} and last["new"] == new_label
    assert Dataset.load(folder).node(first.case_id, first.label_value).metastatic == first.metastatic
    assert len(loads) == 1, "the edit's suspects refresh loaded (and reclassified) the case again"
    assert ui.curationStatusLabel.text == "Saved."


def test_start_training_then_cancel_through_the_buttons_and_one_timer(widget, tmp_path):
    import time

    cohort = tp.make_tiny_cohort(tmp_path / "cohort", cases=6)
    ui = widget.ui
    ui.datasetFolderPathLineEdit.currentPath = str(cohort)
    widget._parameterNode.trainPatch = "48 px at 1.05 mm (faster on CPU)"
    assert ui.startTrainingButton.enabled and not ui.cancelTrainingButton.enabled
    ui.startTrainingButton.click()
    assert not widget.errors, widget.errors
    assert ui.cancelTrainingButton.enabled and not ui.startTrainingButton.enabled and not ui.trainingOptionsCollapsibleButton.enabled
    assert widget._pollTimer.isActive() and ui.trainingProgressBar.visible
    assert ui.trainingPlotWidget.plot_view_node.GetPlotChartNodeID() == widget.controller.state().training_chart.GetID()
    deadline = time.monotonic() + 120
    starting = widget.controller.state().training.status
    while widget.controller.state().training.status == starting and time.monotonic() < deadline:  # the worker's first event
        widget._pollTimer.fire()
        time.sleep(0.1)
    ui.cancelTrainingButton.click()
    assert not ui.cancelTrainingButton.enabled
    deadline = time.monotonic() + 60
    while widget._pollTimer.isActive() and time.monotonic() < deadline:
        widget._pollTimer.fire()
        time.sleep(0.1)
    assert not widget._pollTimer.isActive()
    assert widget.controller.state().training.phase == ctl.CANCELLED
    assert ui.startTrainingButton.enabled and "cancel" in ui.trainingStatusLabel.text.lower()
    assert not list((tmp_path / "models").glob("*.pt"))


@pytest.mark.parametrize("name", ["test_ClassifyButton", "test_TrainingTabStartAndCancel", "test_CurationRelabelsASuspect"])
def test_the_module_self_test_passes_headless(widget, name):
    """The module's own self-test (what "Reload and Test" and the extension build machines run) on this harness."""
    test = widget.module.LymphNodeClassifierTest(name)
    test.setUp()  # clears the real scene: the Widget's scene-close observers run
    getattr(test, name)()
    assert not widget.errors, widget.errors


def test_the_training_plot_view_is_the_panel_s_own_and_goes_with_cleanup(widget):
    """qMRMLLayoutViewFactory::onNodeAdded makes a layout widget for every view node without a parent layout node,
    and a plot view that propagates the chart selection follows other modules' ShowChartInLayout."""
    chart = widget.scene.AddNewNodeByClass("vtkMRMLPlotChartNode")
    widget._showChart(chart)
    view = widget.ui.trainingPlotWidget.plot_view_node
    assert view.IsA("vtkMRMLPlotViewNode") and view.GetScene() is widget.scene
    assert view.GetParentLayoutNode() is widget._parameterNode.parameterNode
    assert not view.GetDoPropagatePlotChartSelection() and not view.GetSaveWithScene()
    assert view.GetLayoutName() and view.GetPlotChartNodeID() == chart.GetID()
    widget._showChart(chart)
    assert len(slicer.util.getNodesByClass("vtkMRMLPlotViewNode", widget.scene)) == 1
    parameterNode = widget._parameterNode
    widget.cleanup()
    assert view.GetScene() is None, "cleanup() left the plot view node in the scene"
    assert widget._parameterNode is None and not widget.hasObserver(parameterNode, vtk.vtkCommand.ModifiedEvent,
                                                                    widget._onParameterNodeModified)


def test_choosing_model_file_keeps_the_path_field_enabled_until_a_path_is_entered(widget, tmp_path):
    ui = widget.ui
    chooser, otherFile = ui.modelChooserComboBox, ui.modelChooserComboBox.count - 1
    assert chooser.itemData(otherFile) is None and not ui.modelPathLineEdit.enabled
    chooser.currentIndex = otherFile
    assert widget._parameterNode.modelPath == ""
    assert chooser.currentIndex == otherFile and ui.modelPathLineEdit.enabled
    widget._parameterNode.gradcamOpacity = 0.5  # any other parameter change re-renders the model widgets
    assert chooser.currentIndex == otherFile and ui.modelPathLineEdit.enabled
    model = tmp_path / "elsewhere" / "my.pt"
    ui.modelPathLineEdit.currentPath = str(model)
    assert widget._parameterNode.modelPath == str(model) and chooser.currentIndex == otherFile
    chooser.currentIndex = 0  # back to the active model
    assert widget._parameterNode.modelPath == "" and not ui.modelPathLineEdit.enabled


def test_a_remembered_dataset_folder_fills_an_empty_parameter_instead_of_being_wiped(widget, tmp_path):
    ui = widget.ui
    assert widget._parameterNode.curationDatasetFolder == ""
    ui.datasetFolderPathLineEdit._path = str(tmp_path)  # what ctkPathLineEdit::retrieveHistory shows, signals blocked
    widget._onParameterNodeModified()
    assert ui.datasetFolderPathLineEdit.currentPath == str(tmp_path)
    assert widget._parameterNode.curationDatasetFolder == str(tmp_path)


def test_a_model_path_is_found_in_a_model_list_through_a_symbolic_link(widget, tmp_path):
    real = tmp_path / "models" / "a.pt"
    real.parent.mkdir(parents=True, exist_ok=True)
    real.write_bytes(b"")
    (tmp_path / "link").symlink_to(real.parent)
    combo = ComboBox("combo", "QComboBox")
    combo.addItem("other", str(tmp_path / "b.pt"))
    combo.addItem("a", str(real))
    assert combo.findData(str(tmp_path / "link" / "a.pt")) == -1  # what an exact comparison finds
    assert widget._findPath(combo, tmp_path / "link" / "a.pt") == 1
    assert widget._findPath(combo, tmp_path / "missing.pt") == -1


def test_the_sample_data_source_is_registered_with_local_files_and_loads_through_the_panel(widget, tmp_path, monkeypatch):
    """SampleDataSource.__init__ checks len(uris) == len(fileNames) == len(nodeNames) == len(loadFiles)
    == len(loadFileTypes); SampleDataLogic.downloadFile fetches each uri with urllib.request.urlretrieve."""
    import hashlib
    import urllib.request

    registered = {}
    sample_data = types.ModuleType("SampleData")
    sample_data.SampleDataLogic = types.SimpleNamespace(
        registerCustomSampleDataSource=lambda **kwargs: registered.update(kwargs))
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)
    widget.module.registerSampleData()
    lists = [registered[key] for key in ("uris", "fileNames", "nodeNames", "loadFiles", "loadFileTypes")]
    assert len({len(values) for values in lists}) == 1 and len(registered["uris"]) == 2
    assert len(registered["checksums"]) == 2
    for uri, fileName, checksum in zip(registered["uris"], registered["fileNames"], registered["checksums"]):
        copied, _ = urllib.request.urlretrieve(uri, tmp_path / fileName)
        algo, digest = checksum.split(":")  # slicer.util.extractAlgoAndDigest's format
        assert algo == "SHA256" and hashlib.sha256(Path(copied).read_bytes()).hexdigest() == digest
    nodes = registered["customDownloader"](None)  # the Sample Data panel's button
    assert nodes is not None and not widget.errors, widget.errors
    assert (widget._parameterNode.inputCT, widget._parameterNode.inputLabels) == nodes
    assert widget.ui.classifyButton.enabled  # the open panel knows the loaded nodes


@pytest.mark.parametrize("testing", [True, False])
def test_a_pytorch_install_failure_is_shown_and_testing_mode_never_installs(widget, monkeypatch, testing):
    """PyTorchUtils.installTorch skips its confirmation in testing mode and runs pip through
    slicer.util._executePythonModule (CalledProcessError on failure), then imports torch."""
    import subprocess

    from LymphNodeClassifierLogic import dependencies

    calls = []

    def install_torch(**kwargs):
        calls.append(kwargs)
        raise subprocess.CalledProcessError(1, ["light-the-torch", "install", "torch"])

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(
        PyTorchUtilsLogic=lambda: types.SimpleNamespace(installTorch=install_torch)))
    monkeypatch.setattr(dependencies, "torch_status", lambda *a, **k: dependencies.TorchStatus(None, "2.1"))
    monkeypatch.setattr(slicer.app, "testingEnabled", lambda: testing)
    assert type(widget).ensurePythonDependencies(widget) is False  # the real method (the fixture replaced it)
    assert len(widget.errors) == 1
    if testing:
        assert calls == [] and "not installed" in widget.errors[0]
    else:
        assert calls[0]["askConfirmation"] and "PyTorch could not be installed" in widget.errors[0]
