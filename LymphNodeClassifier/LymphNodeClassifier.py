"""LymphNodeClassifier: classify lymph nodes on CT as metastatic or benign.

This file only holds what Slicer needs to show the module: the module description, the parameter
node, the Widget (wiring between the .ui file, the parameter node and the logic) and the self-test.
All computation lives in the `LymphNodeClassifierLogic` package (MRML, no Qt) and the
`LymphNodeClassifierLib` package (pure Python), which are imported lazily so that the module loads
even before PyTorch is installed.
"""

import logging
import os
import traceback
from typing import Annotated, Optional, Union

import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import (
    parameterNodeWrapper,
    Choice,
    WithinRange,
)

from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
)

# Names of the window presets offered in the GUI; their HU values come from
# LymphNodeClassifierLib.windowing.WINDOW_PRESETS (a test checks that the names agree).
WINDOW_PRESET_NAMES = ["abdomen", "mediastinum", "neck", "custom"]
CUSTOM_WINDOW = "custom"
DEVICE_NAMES = ["auto", "cpu", "cuda"]

# The bundled TorchScript model is saved with a recent PyTorch; much older releases can't load it.
MINIMUM_TORCH_VERSION = "2.1"

# Columns of the results table (written by LymphNodeClassifierLogic) used to jump to a node.
CENTROID_COLUMNS = ("centroid_R_mm", "centroid_A_mm", "centroid_S_mm")


#
# LymphNodeClassifier
#


class LymphNodeClassifier(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Lymph Node Classifier")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["LymphNodeClassifier developers"]
        self.parent.helpText = _("""
Classifies lymph nodes on CT as metastatic or benign. Select a CT and a label map (or segmentation)
in which each lymph node is masked, choose an intensity window and press <b>Classify</b>: every node
is shown colour-coded by its probability of metastasis, with a results table and a Grad-CAM overlay.
Click a row of the table to centre the views on that node.
See the <a href="https://github.com/LymphNodeClassifier/SlicerLymphNodeClassifier#readme">module documentation</a>.
""")
        self.parent.acknowledgementText = _("""
Built on the 3D Slicer scripted module template (Jean-Christophe Fillion-Robin, Kitware Inc.,
Andras Lasso, PerkLab, and Steve Pieper, Isomics, Inc.) and the Slicer PyTorch extension.
""")


#
# LymphNodeClassifierParameterNode
#


@parameterNodeWrapper
class LymphNodeClassifierParameterNode:
    """
    The parameters of the module, saved with the scene.

    inputCT - the CT volume (HU).
    inputLabels - label map volume or segmentation masking the lymph nodes (one value/segment per node).
    windowPreset - named intensity window, or "custom" to use windowLow/windowHigh.
    windowLow, windowHigh - the window in HU (filled in from the preset unless it is "custom").
    modelPath - TorchScript model file; empty for the bundled model.
    device - "auto" (GPU if present, else CPU), "cpu" or "cuda".
    gradcamOpacity - opacity of the Grad-CAM overlay in the slice views.
    outputSegmentation, outputTable, outputGradCam - results of the last classification.
    """

    inputCT: vtkMRMLScalarVolumeNode
    # None is part of the Union because the wrapper needs it to store "nothing selected".
    inputLabels: Optional[Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode]]
    windowPreset: Annotated[str, Choice(WINDOW_PRESET_NAMES)] = "abdomen"
    windowLow: Annotated[float, WithinRange(-2000.0, 4000.0)] = -135.0
    windowHigh: Annotated[float, WithinRange(-2000.0, 4000.0)] = 215.0
    modelPath: str = ""
    device: Annotated[str, Choice(DEVICE_NAMES)] = "auto"
    gradcamOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.4
    outputSegmentation: vtkMRMLSegmentationNode
    outputTable: vtkMRMLTableNode
    outputGradCam: vtkMRMLScalarVolumeNode


#
# LymphNodeClassifierWidget
#


class LymphNodeClassifierWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wiring only: .ui <-> parameter node <-> LymphNodeClassifierLogic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._lastWindowPreset = None
        self._updatingModelWidgets = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LymphNodeClassifier.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = LymphNodeClassifierLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # The model path is a plain string ("" = bundled model), which the parameter node wrapper
        # can't bind to a ctkPathLineEdit, so the model widgets are wired by hand.
        self.ui.modelChooserComboBox.clear()
        self.ui.modelChooserComboBox.addItem(_("Bundled model"), "")
        for path in self.logic.bundledModelPaths():
            self.ui.modelChooserComboBox.addItem(os.path.basename(path), path)
        self.ui.modelChooserComboBox.addItem(_("Model file..."), None)
        self.ui.modelChooserComboBox.connect("currentIndexChanged(int)", self.onModelChosen)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathEdited)

        self.ui.loadSampleCaseButton.connect("clicked(bool)", self.onLoadSampleCase)
        self.ui.classifyButton.connect("clicked(bool)", self.onClassifyButton)
        self.ui.gradcamOpacitySliderWidget.connect("valueChanged(double)", self.onGradCamOpacityChanged)
        self.ui.resultsTableView.connect("selectionChanged()", self.onResultSelectionChanged)
        self.ui.progressBar.hide()

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputCT:
            for volume in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
                if not volume.IsA("vtkMRMLLabelMapVolumeNode"):
                    self._parameterNode.inputCT = volume
                    break
        if not self._parameterNode.inputLabels:
            labels = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLLabelMapVolumeNode")
            if labels:
                self._parameterNode.inputLabels = labels

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" dynamic property in the .ui are bound here.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        if not parameters:
            return

        # Window: a preset fills in its HU values; only "custom" lets the user edit them.
        custom = parameters.windowPreset == CUSTOM_WINDOW
        self.ui.windowLowSpinBox.enabled = custom
        self.ui.windowHighSpinBox.enabled = custom
        if not custom and parameters.windowPreset != self._lastWindowPreset:
            low, high = self.logic.presetWindow(parameters.windowPreset)
            if (parameters.windowLow, parameters.windowHigh) != (low, high):
                with slicer.util.NodeModify(parameters):
                    parameters.windowLow = low
                    parameters.windowHigh = high
        self._lastWindowPreset = parameters.windowPreset

        self._updateModelWidgets()

        if parameters.inputCT and parameters.inputLabels:
            self.ui.classifyButton.toolTip = _("Classify every masked lymph node of the CT")
            self.ui.classifyButton.enabled = True
        else:
            self.ui.classifyButton.toolTip = _("Select a CT volume and the label map or segmentation of its lymph nodes")
            self.ui.classifyButton.enabled = False

        if self.ui.resultsTableView.mrmlTableNode() is not parameters.outputTable:
            self.ui.resultsTableView.setMRMLTableNode(parameters.outputTable)
        self.ui.resultsCollapsibleButton.enabled = parameters.outputTable is not None
        self.ui.gradcamOpacitySliderWidget.enabled = parameters.outputGradCam is not None

    # -- model choice ------------------------------------------------------------------

    def _updateModelWidgets(self) -> None:
        """Show the parameter node's model path in the model combo box and path field."""
        if self._updatingModelWidgets:
            return
        self._updatingModelWidgets = True
        try:
            modelPath = self._parameterNode.modelPath
            index = self.ui.modelChooserComboBox.findData(modelPath) if modelPath else 0
            if index < 0:  # a file that is not bundled
                index = self.ui.modelChooserComboBox.count - 1
            self.ui.modelChooserComboBox.currentIndex = index
            isOtherFile = index == self.ui.modelChooserComboBox.count - 1
            self.ui.modelPathLineEdit.enabled = isOtherFile
            if isOtherFile and self.ui.modelPathLineEdit.currentPath != modelPath:
                self.ui.modelPathLineEdit.currentPath = modelPath
        finally:
            self._updatingModelWidgets = False

    def onModelChosen(self, index: int) -> None:
        if self._updatingModelWidgets or not self._parameterNode:
            return
        path = self.ui.modelChooserComboBox.itemData(index)
        if path is None:  # "Model file...": take the path field
            path = self.ui.modelPathLineEdit.currentPath
            self.ui.modelPathLineEdit.enabled = True
        self._parameterNode.modelPath = path

    def onModelPathEdited(self, path: str) -> None:
        if self._updatingModelWidgets or not self._parameterNode:
            return
        self._parameterNode.modelPath = path

    # -- actions -----------------------------------------------------------------------

    def onLoadSampleCase(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to load the sample case."), waitCursor=True):
            ctNode, labelsNode = self.logic.loadSampleCase()
            self._parameterNode.inputCT = ctNode
            self._parameterNode.inputLabels = labelsNode

    def onClassifyButton(self) -> None:
        if not self.ensurePythonDependencies():
            return
        from LymphNodeClassifierLib.errors import InputError

        self._setBusy(True)
        try:
            with slicer.util.WaitCursor():
                result = self.logic.classify(self._parameterNode, progress=self._onProgress)
        except InputError as error:
            slicer.util.errorDisplay(str(error))
            return
        except Exception as error:
            logging.exception("Lymph node classification failed")
            slicer.util.errorDisplay(_("Classification failed: {error}").format(error=error), detailedText=traceback.format_exc())
            return
        finally:
            self._setBusy(False)
        self._showResult(result)

    def _setBusy(self, busy: bool) -> None:
        self.ui.classifyButton.enabled = not busy
        self.ui.progressBar.value = 0
        self.ui.progressBar.format = "%p%"
        self.ui.progressBar.visible = busy
        if not busy:
            self._onParameterNodeModified()

    def _onProgress(self, fraction: float, message: str = "") -> None:
        self.ui.progressBar.value = int(round(100 * max(0.0, min(1.0, float(fraction)))))
        self.ui.progressBar.format = f"{message} %p%" if message else "%p%"
        slicer.app.processEvents()

    def _showResult(self, result) -> None:
        parameters = self._parameterNode
        self.ui.resultsTableView.setMRMLTableNode(result.table_node)
        slicer.util.setSliceViewerLayers(
            background=parameters.inputCT,
            foreground=result.gradcam_node,
            foregroundOpacity=parameters.gradcamOpacity if result.gradcam_node else 0.0,
        )
        nodeCount = len(result.nodes)
        self.ui.resultsSummaryLabel.text = _("{count} lymph nodes classified.").format(count=nodeCount)

    def onGradCamOpacityChanged(self, opacity: float) -> None:
        if self._parameterNode and self._parameterNode.outputGradCam:
            slicer.util.setSliceViewerLayers(foreground=self._parameterNode.outputGradCam, foregroundOpacity=opacity)

    def onResultSelectionChanged(self) -> None:
        """Centre the slice views on the node of the selected table row."""
        tableNode = self.ui.resultsTableView.mrmlTableNode()
        index = self.ui.resultsTableView.selectionModel().currentIndex()
        if tableNode is None or not index.isValid():
            return
        row = self.ui.resultsTableView.sortFilterProxyModel().mapToSource(index).row()
        centroid = self.logic.centroidOfTableRow(tableNode, row)
        if centroid is not None:
            slicer.modules.markups.logic().JumpSlicesToLocation(*centroid, True)

    # -- dependencies ------------------------------------------------------------------

    def ensurePythonDependencies(self) -> bool:
        """Make sure PyTorch (through the PyTorch extension) and Resources/requirements.txt are installed.

        Returns False (after telling the user why) when they are missing and were not installed.
        """
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            slicer.util.errorDisplay(_(
                "Lymph Node Classifier needs the PyTorch extension. Install 'PyTorch' from the "
                "Extensions Manager, restart Slicer, then press Classify again."))
            return False
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            torch = torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}")
            if torch is None:
                slicer.util.errorDisplay(_(
                    "PyTorch is not installed, so lymph nodes can't be classified. Press Classify again "
                    "to install it, or install it from the PyTorch Utils module."))
                return False

        requirementsPath = self.resourcePath("requirements.txt")
        try:
            self.logic.ensureRequirements(requirementsPath)
        except Exception as error:
            slicer.util.errorDisplay(
                _("The Python packages Lymph Node Classifier needs are not installed: {error}").format(error=error),
                detailedText=traceback.format_exc())
            return False
        return True


#
# LymphNodeClassifierLogic
#


class LymphNodeClassifierLogic(ScriptedLoadableModuleLogic):
    """Thin Slicer-facing wrapper around `LymphNodeClassifierLogic.ClassificationLogic`.

    The computation lives in the `LymphNodeClassifierLogic` package (imported lazily, because it
    needs PyTorch); this class adds the parameter node and a few helpers for the Widget.
    Note: inside this file the name `LymphNodeClassifierLogic` is this class, so the package is only
    ever reached with `from LymphNodeClassifierLogic import ...`.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._classification = None

    def getParameterNode(self):
        return LymphNodeClassifierParameterNode(super().getParameterNode())

    @property
    def classification(self):
        """The package's ClassificationLogic (created on first use; it caches loaded models)."""
        if self._classification is None:
            from LymphNodeClassifierLogic import ClassificationLogic

            self._classification = ClassificationLogic()
        return self._classification

    @staticmethod
    def moduleDir() -> str:
        return os.path.dirname(os.path.abspath(__file__))

    def bundledModelPaths(self) -> list:
        modelsDir = os.path.join(self.moduleDir(), "Resources", "Models")
        if not os.path.isdir(modelsDir):
            return []
        return [os.path.join(modelsDir, name) for name in sorted(os.listdir(modelsDir)) if name.endswith(".pt")]

    @staticmethod
    def presetWindow(preset: str) -> tuple:
        """(low, high) HU of a named window preset."""
        from LymphNodeClassifierLib.windowing import WINDOW_PRESETS

        low, high = WINDOW_PRESETS[preset]
        return float(low), float(high)

    def classify(self, parameterNode, progress=None):
        """Classify the nodes selected in `parameterNode` and store the output nodes in it."""
        from LymphNodeClassifierLib.windowing import resolve_window

        window = resolve_window(parameterNode.windowPreset, parameterNode.windowLow, parameterNode.windowHigh)
        result = self.classification.classify(
            parameterNode.inputCT,
            parameterNode.inputLabels,
            model_path=parameterNode.modelPath or None,
            window=window,
            device=parameterNode.device,
            gradcam=True,
            progress=progress,
        )
        with slicer.util.NodeModify(parameterNode):
            parameterNode.outputSegmentation = result.segmentation_node
            parameterNode.outputTable = result.table_node
            parameterNode.outputGradCam = result.gradcam_node
        return result

    def extractNodeTable(self, ctVolumeNode, labelsNode):
        """Table of node measurements (no model needed)."""
        return self.classification.extract_node_table(ctVolumeNode, labelsNode)

    @staticmethod
    def centroidOfTableRow(tableNode, row: int):
        """RAS centroid of the node in `row` of a results table, or None if the table has none."""
        table = tableNode.GetTable() if tableNode else None
        if table is None or not 0 <= row < table.GetNumberOfRows():
            return None
        columns = [table.GetColumnByName(name) for name in CENTROID_COLUMNS]
        if any(column is None for column in columns):
            return None
        return tuple(float(column.GetValue(row)) for column in columns)

    def loadSampleCase(self):
        """Load the first case of the bundled sample dataset; returns (CT node, label map node)."""
        import json

        from LymphNodeClassifierLib.errors import InputError

        datasetDir = os.path.join(self.moduleDir(), "Resources", "SampleData")
        manifestPath = os.path.join(datasetDir, "dataset.json")
        if not os.path.isfile(manifestPath):
            raise InputError(f"The sample dataset is missing ({manifestPath}); reinstall the extension.")
        with open(manifestPath, encoding="utf-8") as manifest:
            case = json.load(manifest)["cases"][0]
        ctNode = slicer.util.loadVolume(os.path.join(datasetDir, case["ct"]))
        labelsNode = slicer.util.loadLabelVolume(os.path.join(datasetDir, case["labels"]))
        return ctNode, labelsNode

    @staticmethod
    def ensureRequirements(requirementsPath: str) -> None:
        """Install the packages of a requirements file that are missing, after asking the user.

        Raises RuntimeError if the user declines.
        """
        packaging = getattr(slicer, "packaging", None)
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(packaging.load_requirements(requirementsPath), requester="Lymph Node Classifier")
            return

        # Slicer releases without slicer.packaging: check with importlib.metadata, install with pip.
        import importlib.metadata

        from packaging.requirements import Requirement

        missing = []
        with open(requirementsPath, encoding="utf-8") as requirementsFile:
            for line in requirementsFile:
                line = line.strip()
                if not line or line.startswith(("#", "-")):
                    continue
                requirement = Requirement(line)
                try:
                    installed = importlib.metadata.version(requirement.name)
                except importlib.metadata.PackageNotFoundError:
                    installed = None
                if installed is None or not requirement.specifier.contains(installed, prereleases=True):
                    missing.append(line)
        if not missing:
            return
        if not slicer.util.confirmOkCancelDisplay(
                _("Lymph Node Classifier will install these Python packages: {packages}").format(packages=", ".join(missing))):
            raise RuntimeError("installation declined by the user")
        slicer.util.pip_install(missing)


#
# LymphNodeClassifierTest
#


class LymphNodeClassifierTest(ScriptedLoadableModuleTest):
    """Runs, inside Slicer, the same sample-case scenarios as the headless pytest suites."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SampleCaseScenarios()

    def test_SampleCaseScenarios(self):
        """Load the bundled sample case, classify it, check segments, table rows and a re-run."""
        self.delayDisplay("Running the sample case scenarios")
        from LymphNodeClassifierLogic import scenarios

        scenarios.run_all()
        self.delayDisplay("Test passed")
