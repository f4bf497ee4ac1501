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

import qt
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

# Training options of the Training tab; the names and defaults are those of
# LymphNodeClassifierLib.training (Testing/test_training_process.py checks that they agree).
TRAIN_ARCHITECTURES = ["custom", "resnet"]
TRAIN_VIEWS = ["triplanar", "axial"]
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
TRAINING_TIMER_INTERVAL_MS = 500


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
The <b>Curation</b> tab opens a dataset folder to review and relabel its nodes (every edit is saved at once,
with an audit journal) and to train a new model in the background, compare it with the active model and
the short-axis size rule on the same test set, and make it the active model.
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
    modelPath - TorchScript model file; empty for the active model (the bundled one until another is made active).
    device - "auto" (GPU if present, else CPU), "cpu" or "cuda".
    gradcamOpacity - opacity of the Grad-CAM overlay in the slice views.
    outputSegmentation, outputTable, outputGradCam - results of the last classification.
    curationDatasetFolder - the dataset folder of the Curation tab.
    train* - the Training tab's options (see TRAINING_PARAMETERS; trainSplit "80/10/10" or "k-fold"
        with trainFolds folds; trainPatch one of TRAIN_PATCHES).
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
    curationDatasetFolder: str = ""
    trainArchitecture: Annotated[str, Choice(TRAIN_ARCHITECTURES)] = "custom"
    trainViews: Annotated[str, Choice(TRAIN_VIEWS)] = "triplanar"
    trainMaskChannel: bool = False
    trainEpochs: Annotated[int, WithinRange(1, 1000)] = 40
    trainBatchSize: Annotated[int, WithinRange(2, 1024)] = 32
    trainLearningRate: Annotated[float, WithinRange(0.00001, 1.0)] = 0.001
    trainFlips: bool = True
    trainRotationDegrees: Annotated[float, WithinRange(0.0, 180.0)] = 180.0
    trainTranslationPx: Annotated[float, WithinRange(0.0, 32.0)] = 10.0
    trainPatience: Annotated[int, WithinRange(1, 1000)] = 8
    trainLRPatience: Annotated[int, WithinRange(1, 1000)] = 3
    trainSeed: Annotated[int, WithinRange(0, 2147483647)] = 0
    trainSplit: Annotated[str, Choice(TRAIN_SPLITS)] = "80/10/10"
    trainFolds: Annotated[int, WithinRange(2, 20)] = 5
    trainPatch: Annotated[str, Choice(list(TRAIN_PATCHES))] = "64 px at 0.79 mm (study)"  # TRAIN_PATCH_DEFAULT


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
        self._trainingRun = None
        self._trainingTimer = None
        self._suspectSearch = None
        self._suspectsTimer = None
        self._plotViewNode = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LymphNodeClassifier.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = LymphNodeClassifierLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # The model path is a plain string ("" = the active model), which the parameter node wrapper
        # can't bind to a ctkPathLineEdit, so the model widgets are wired by hand.
        self._populateModelChoosers()
        self.ui.modelChooserComboBox.connect("currentIndexChanged(int)", self.onModelChosen)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathEdited)

        self.ui.loadSampleCaseButton.connect("clicked(bool)", self.onLoadSampleCase)
        self.ui.classifyButton.connect("clicked(bool)", self.onClassifyButton)
        self.ui.gradcamOpacitySliderWidget.connect("valueChanged(double)", self.onGradCamOpacityChanged)
        self.ui.resultsTableView.connect("selectionChanged()", self.onResultSelectionChanged)
        self.ui.progressBar.hide()

        # Curation tab
        self.ui.datasetFolderPathLineEdit.connect("currentPathChanged(QString)", self.onDatasetFolderEdited)
        self.ui.openDatasetButton.connect("clicked(bool)", self.onOpenDataset)
        self.ui.curationTableView.connect("selectionChanged()", self.onCurationSelectionChanged)
        self.ui.loadCaseButton.connect("clicked(bool)", self.onLoadCase)
        self.ui.markMetastaticButton.connect("clicked(bool)", lambda: self.onRelabel(1))
        self.ui.markBenignButton.connect("clicked(bool)", lambda: self.onRelabel(0))
        self.ui.excludeNodeButton.connect("clicked(bool)", self.onExcludeNode)
        self.ui.excludeCaseButton.connect("clicked(bool)", self.onExcludeCase)
        self.ui.includeNodeButton.connect("clicked(bool)", self.onIncludeNode)
        self.ui.includeCaseButton.connect("clicked(bool)", self.onIncludeCase)
        self.ui.saveNodeNoteButton.connect("clicked(bool)", self.onSaveNodeNote)
        self.ui.saveCaseNoteButton.connect("clicked(bool)", self.onSaveCaseNote)
        self.ui.reviewButton.connect("clicked(bool)", self.onReview)
        self.ui.reviewTableView.connect("selectionChanged()", self.onReviewSelectionChanged)
        self.ui.suspectsTableView.connect("selectionChanged()", self.onSuspectSelectionChanged)
        self.ui.suspectsCollapsibleButton.visible = False
        self.ui.findSuspectsButton.connect("clicked(bool)", self.onFindSuspects)
        self.ui.cancelSuspectsButton.connect("clicked(bool)", self.onCancelSuspects)
        self.ui.cancelSuspectsButton.enabled = False
        self._suspectsTimer = qt.QTimer()
        self._suspectsTimer.setInterval(TRAINING_TIMER_INTERVAL_MS)
        self._suspectsTimer.connect("timeout()", self.onSuspectsTimer)

        # Training sub-tab: a timer polls the background process; no training happens in Slicer itself.
        self._trainingTimer = qt.QTimer()
        self._trainingTimer.setInterval(TRAINING_TIMER_INTERVAL_MS)
        self._trainingTimer.connect("timeout()", self.onTrainingTimer)
        self.ui.startTrainingButton.connect("clicked(bool)", self.onStartTraining)
        self.ui.showRocCheckBox.connect("toggled(bool)", self.onShowRocToggled)
        self.ui.cancelTrainingButton.connect("clicked(bool)", self.onCancelTraining)
        self.ui.makeActiveButton.connect("clicked(bool)", self.onMakeActive)
        self.ui.trainedModelComboBox.connect("currentIndexChanged(int)", self.onTrainedModelChosen)
        self.ui.trainingProgressBar.hide()

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._trainingTimer is not None:
            self._trainingTimer.stop()
        if self._trainingRun is not None and not self._trainingRun.finished:
            self._trainingRun.cancel(wait=True, timeout=5.0)  # never leave a worker running
        if self._suspectsTimer is not None:
            self._suspectsTimer.stop()
        if self._suspectSearch is not None and not self._suspectSearch.finished:
            self._suspectSearch.cancel(wait=True, timeout=5.0)
        if self.logic is not None:
            self.logic.closeCuration()
        self.removeObservers()

    def enter(self) -> None:
        self._populateModelChoosers()  # models may have been added (or PyTorch installed) meanwhile
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        # The curation and training nodes went with the scene; the dataset stays open.
        self._plotViewNode = None
        if self.logic is not None:
            self.logic.curationSceneClosed()
            self.ui.curationTableView.setMRMLTableNode(None)
            self.ui.reviewTableView.setMRMLTableNode(None)
            self.ui.trainingResultsTableView.setMRMLTableNode(None)
            self.ui.showRocCheckBox.checked = False  # its chart went with the scene
            self.ui.showRocCheckBox.enabled = False
            self._refreshSuspects()
            self._updateCurationSummary()
            self._updateCurationButtons()
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

        if self.ui.datasetFolderPathLineEdit.currentPath != parameters.curationDatasetFolder:
            self.ui.datasetFolderPathLineEdit.currentPath = parameters.curationDatasetFolder
        self.ui.trainFoldsSpinBox.enabled = parameters.trainSplit == TRAIN_SPLIT_KFOLD
        self._updateTrainingButtons()

    # -- model choice ------------------------------------------------------------------

    def _populateModelChoosers(self) -> None:
        """Fill both model lists from the model folder: the Classify tab's and the Training tab's."""
        self._updatingModelWidgets = True
        try:
            entries = self.logic.listModels()
            activePath = self.logic.activeModelPath()
            chooser = self.ui.modelChooserComboBox
            chooser.clear()
            activeName = os.path.basename(activePath) if activePath else _("none")
            chooser.addItem(_("Active model ({name})").format(name=activeName), "")
            for entry in entries:
                if entry.ok:
                    chooser.addItem(entry.label(), str(entry.path))
            chooser.addItem(_("Model file..."), None)

            trained = self.ui.trainedModelComboBox
            previous = trained.currentData
            trained.clear()
            for entry in entries:
                trained.addItem(entry.label(), str(entry.path))
                trained.setItemData(trained.count - 1, entry.error or str(entry.path), qt.Qt.ToolTipRole)
            index = trained.findData(previous) if previous else -1
            trained.currentIndex = index if index >= 0 else 0
            self.ui.activeModelLabel.text = activePath or _("none (no model is available)")
            self.ui.modelsFolderLabel.text = self.logic.modelsFolder()
        finally:
            self._updatingModelWidgets = False
        self.onTrainedModelChosen()
        if self._parameterNode:
            self._updateModelWidgets()

    def _updateModelWidgets(self) -> None:
        """Show the parameter node's model path in the model combo box and path field."""
        if self._updatingModelWidgets:
            return
        self._updatingModelWidgets = True
        try:
            modelPath = self._parameterNode.modelPath
            index = self.ui.modelChooserComboBox.findData(modelPath) if modelPath else 0
            if index < 0:  # a file that is not in the model folder
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

    def onTrainedModelChosen(self, index: int = -1) -> None:
        if self._updatingModelWidgets:
            return
        path = self.ui.trainedModelComboBox.currentData
        self.ui.makeActiveButton.enabled = bool(path) and path != self.logic.activeModelPath()

    def onMakeActive(self) -> None:
        path = self.ui.trainedModelComboBox.currentData
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to make the model active."), waitCursor=True):
            self.logic.setActiveModel(path)
            self.ui.trainingStatusLabel.text = _("Active model: {path}").format(path=path)
        self._populateModelChoosers()

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
        row = self._selectedRow(self.ui.resultsTableView)
        if tableNode is None or row < 0:
            return
        centroid = self.logic.centroidOfTableRow(tableNode, row)
        if centroid is not None:
            self._jumpTo(centroid)

    @staticmethod
    def _selectedRow(tableView) -> int:
        """The selected row of a qMRMLTableView in the table node's own order (-1 if none)."""
        if tableView.mrmlTableNode() is None:
            return -1
        index = tableView.selectionModel().currentIndex()
        if not index.isValid():
            return -1
        return tableView.sortFilterProxyModel().mapToSource(index).row()

    @staticmethod
    def _jumpTo(centroidRAS) -> None:
        slicer.modules.markups.logic().JumpSlicesToLocation(*centroidRAS, True)

    # -- curation ----------------------------------------------------------------------

    def onDatasetFolderEdited(self, path: str) -> None:
        if self._parameterNode and self._parameterNode.curationDatasetFolder != path:
            self._parameterNode.curationDatasetFolder = path

    def onOpenDataset(self) -> None:
        if not self.ensurePythonDependencies():
            return
        folder = self.ui.datasetFolderPathLineEdit.currentPath
        with slicer.util.tryWithErrorDisplay(_("Failed to open the dataset."), waitCursor=True):
            tableNode = self.logic.openDataset(folder)
            self.ui.datasetFolderPathLineEdit.addCurrentPathToHistory()
            self.ui.curationTableView.setMRMLTableNode(tableNode)
            self.ui.reviewTableView.setMRMLTableNode(None)
            self._refreshSuspects()
            self._updateCurationSummary()
        self._updateCurationButtons()
        self._updateTrainingButtons()

    def _updateCurationSummary(self, message: str = "") -> None:
        self.ui.datasetSummaryLabel.text = self.logic.curation.summary() if self.logic.curationIsOpen() else ""
        self.ui.curationStatusLabel.text = message

    def _selectedCurationKey(self):
        if not self.logic.curationIsOpen():
            return None
        return self.logic.curation.row_key(self._selectedRow(self.ui.curationTableView))

    def _updateCurationButtons(self) -> None:
        isOpen = self.logic.curationIsOpen()
        key = self._selectedCurationKey()
        hasCase, hasNode = key is not None, key is not None and key[1] is not None
        self.ui.reviewButton.enabled = isOpen
        searching = self._suspectSearch is not None and not self._suspectSearch.finished
        self.ui.findSuspectsButton.enabled = isOpen and not searching
        self.ui.loadCaseButton.enabled = hasCase
        for button in (self.ui.markMetastaticButton, self.ui.markBenignButton, self.ui.excludeNodeButton,
                       self.ui.includeNodeButton, self.ui.saveNodeNoteButton):
            button.enabled = hasNode
        for button in (self.ui.excludeCaseButton, self.ui.includeCaseButton, self.ui.saveCaseNoteButton):
            button.enabled = hasCase

    def onCurationSelectionChanged(self) -> None:
        self._updateCurationButtons()
        row = self._selectedRow(self.ui.curationTableView)
        info = self.logic.curation.row_info(row) if self.logic.curationIsOpen() else None
        if info is not None:
            self.ui.noteLineEdit.text = info["note"]
            self.ui.excludeReasonLineEdit.text = info["reason"].replace("case: ", "", 1)

    def onLoadCase(self) -> None:
        key = self._selectedCurationKey()
        if key is not None:
            self._loadCaseAndJump(*key)

    def _loadCaseAndJump(self, caseId: str, labelValue) -> None:
        if not self.ensurePythonDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to load the case."), waitCursor=True):
            loaded = self.logic.loadCurationCase(caseId, self._parameterNode.modelPath)
            gradcam = loaded.outputs.gradcam_node if loaded.outputs is not None else None
            slicer.util.setSliceViewerLayers(background=loaded.ct_node, label=None if loaded.outputs else loaded.labels_node,
                                             foreground=gradcam, foregroundOpacity=self._parameterNode.gradcamOpacity if gradcam else 0.0,
                                             fit=True)
            if labelValue is not None:
                centroid = self.logic.curation.node_centroid_ras(caseId, labelValue)
                if centroid is not None:
                    self._jumpTo(centroid)
            self._updateCurationSummary(loaded.message or _("Case {case} loaded.").format(case=caseId))

    def _curationEdit(self, action, failure: str) -> None:
        key = self._selectedCurationKey()
        if key is None:
            return
        entry = None
        with slicer.util.tryWithErrorDisplay(failure):
            entry = action(*key)
            message = _("Saved.") if entry is not None else _("Nothing changed.")
            self._updateCurationSummary(message)
        if entry is not None:
            with slicer.util.tryWithErrorDisplay(_("The edit was saved, but the suspect list could not be refreshed.")):
                self._refreshSuspects()  # its since_ranked column shows the edit
        self._updateCurationButtons()

    def onRelabel(self, metastatic: int) -> None:
        self._curationEdit(lambda caseId, labelValue: self.logic.curation.set_label(caseId, labelValue, metastatic),
                           _("Failed to relabel the node."))

    def onExcludeNode(self) -> None:
        reason = self.ui.excludeReasonLineEdit.text
        self._curationEdit(lambda caseId, labelValue: self.logic.curation.exclude_node(caseId, labelValue, reason),
                           _("Failed to exclude the node."))

    def onIncludeNode(self) -> None:
        self._curationEdit(lambda caseId, labelValue: self.logic.curation.include_node(caseId, labelValue),
                           _("Failed to include the node."))

    def onExcludeCase(self) -> None:
        reason = self.ui.excludeReasonLineEdit.text
        self._curationEdit(lambda caseId, labelValue: self.logic.curation.exclude_case(caseId, reason),
                           _("Failed to exclude the case."))

    def onIncludeCase(self) -> None:
        self._curationEdit(lambda caseId, labelValue: self.logic.curation.include_case(caseId),
                           _("Failed to include the case."))

    def onSaveNodeNote(self) -> None:
        note = self.ui.noteLineEdit.text
        self._curationEdit(lambda caseId, labelValue: self.logic.curation.set_node_note(caseId, labelValue, note),
                           _("Failed to save the note."))

    def onSaveCaseNote(self) -> None:
        note = self.ui.noteLineEdit.text
        self._curationEdit(lambda caseId, labelValue: self.logic.curation.set_case_note(caseId, note),
                           _("Failed to save the note."))

    def onReview(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to check the dataset."), waitCursor=True):
            reviewNode = self.logic.curation.review(progress=lambda done, total: slicer.app.processEvents())
            self.ui.reviewTableView.setMRMLTableNode(reviewNode)
            count = reviewNode.GetNumberOfRows()
            self._updateCurationSummary(_("{count} problems found.").format(count=count))
            self.ui.reviewCollapsibleButton.collapsed = False
        self._refreshSuspects()

    def onReviewSelectionChanged(self) -> None:
        """Select the problem's node (or case) in the cases table."""
        key = self.logic.curation.review_key(self._selectedRow(self.ui.reviewTableView)) if self.logic.curationIsOpen() else None
        if key is None:
            return
        row = self.logic.curation.row_of(*key)
        if row < 0:
            row = self.logic.curation.row_of(key[0])
        if row >= 0:
            self.ui.curationTableView.selectRow(self.ui.curationTableView.sortFilterProxyModel().mapFromSource(
                self.ui.curationTableView.sortFilterProxyModel().sourceModel().index(row, 0)).row())

    def _refreshSuspects(self) -> None:
        """Show the suspects list when the dataset folder has a suspects.csv."""
        suspectsNode = self.logic.curation.suspects_table() if self.logic.curationIsOpen() else None
        self.ui.suspectsCollapsibleButton.visible = suspectsNode is not None
        self.ui.suspectsTableView.setMRMLTableNode(suspectsNode)

    def onFindSuspects(self) -> None:
        """Rank the open dataset's labels in a background process; the list appears when it is done."""
        if self._suspectSearch is not None and not self._suspectSearch.finished:
            return
        if not self.ensurePythonDependencies():  # the worker needs PyTorch, scikit-learn and cleanlab
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the suspect search."), waitCursor=True):
            self._suspectSearch = self.logic.startSuspectSearch()
            self.ui.findSuspectsButton.enabled = False
            self.ui.cancelSuspectsButton.enabled = True
            self.ui.suspectsStatusLabel.text = self._suspectSearch.status()
            self._suspectsTimer.start()

    def onSuspectsTimer(self) -> None:
        search = self._suspectSearch
        if search is None:
            self._suspectsTimer.stop()
            return
        search.poll()
        self.ui.suspectsStatusLabel.text = search.status()
        if not search.finished:
            return
        self._suspectsTimer.stop()
        self.ui.cancelSuspectsButton.enabled = False
        self._updateCurationButtons()
        event = search.final_event or {}
        if event.get("event") == "done":
            with slicer.util.tryWithErrorDisplay(_("Failed to show the suspect list.")):
                self._refreshSuspects()
                self.ui.suspectsCollapsibleButton.collapsed = False
        elif event.get("event") == "error":
            slicer.util.errorDisplay(_("The suspect search failed: {message}").format(message=event.get("message", "")),
                                     detailedText=search.stderr_tail())

    def onCancelSuspects(self) -> None:
        if self._suspectSearch is not None:
            self._suspectSearch.cancel(wait=False)  # the timer keeps polling until the worker has exited
            self.ui.suspectsStatusLabel.text = self._suspectSearch.status()
            self.ui.cancelSuspectsButton.enabled = False

    def onSuspectSelectionChanged(self) -> None:
        """Load the suspect's case and centre the views on its node."""
        key = self.logic.curation.suspect_key(self._selectedRow(self.ui.suspectsTableView)) if self.logic.curationIsOpen() else None
        if key is not None:
            self._loadCaseAndJump(*key)

    # -- training ------------------------------------------------------------------------

    def _updateTrainingButtons(self) -> None:
        running = self._trainingRun is not None and not self._trainingRun.finished
        hasDataset = bool(self._parameterNode and self._parameterNode.curationDatasetFolder)
        self.ui.startTrainingButton.enabled = hasDataset and not running
        self.ui.cancelTrainingButton.enabled = running
        self.ui.trainingOptionsCollapsibleButton.enabled = not running

    def _showTrainingChart(self, chartNode) -> None:
        if self._plotViewNode is None or self._plotViewNode.GetScene() is None:
            self._plotViewNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotViewNode", "LymphNodeClassifier training plot view")
            self.ui.trainingPlotView.setMRMLPlotViewNode(self._plotViewNode)
        self._plotViewNode.SetPlotChartNodeID(chartNode.GetID())

    def onStartTraining(self) -> None:
        if self._trainingRun is not None and not self._trainingRun.finished:
            return
        if not self.ensurePythonDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the training."), waitCursor=True):
            self._trainingRun = self.logic.startTraining(self._parameterNode, self._trainingRun)
            self.ui.showRocCheckBox.checked = False
            self.ui.showRocCheckBox.enabled = False
            self._showTrainingChart(self._trainingRun.curves.chart_node)
            self.ui.trainingResultsTableView.setMRMLTableNode(None)
            self.ui.trainingProgressBar.value = 0
            self.ui.trainingProgressBar.show()
            self.ui.trainingStatusLabel.text = self._trainingRun.status
            self._trainingTimer.start()
        self._updateTrainingButtons()

    def onTrainingTimer(self) -> None:
        run = self._trainingRun
        if run is None:
            self._trainingTimer.stop()
            return
        try:
            run.step()
        except Exception as error:
            logging.exception("Reading the training process failed")
            self._trainingTimer.stop()
            run.cancel(wait=False)
            slicer.util.errorDisplay(_("Training failed: {error}").format(error=error), detailedText=traceback.format_exc())
            return
        self.ui.trainingProgressBar.value = int(round(100 * run.progress))
        self.ui.trainingStatusLabel.text = run.status
        if not run.finished:
            return
        self._trainingTimer.stop()
        self.ui.trainingProgressBar.hide()
        self._updateTrainingButtons()
        if run.outcome == "done":
            self.ui.trainingResultsTableView.setMRMLTableNode(run.results_node)
            self.ui.showRocCheckBox.enabled = run.roc_chart_node is not None
            self.ui.showRocCheckBox.checked = run.roc_chart_node is not None  # shows the ROC in the plot view
            self._populateModelChoosers()
            index = self.ui.trainedModelComboBox.findData(run.model_path)
            if index >= 0:
                self.ui.trainedModelComboBox.currentIndex = index
        elif run.outcome == "error":
            slicer.util.errorDisplay(_("Training failed: {message}").format(message=run.message),
                                     detailedText=run.process.stderr_tail())

    def onShowRocToggled(self, checked: bool) -> None:
        """The plot view shows the test-set ROC of the finished run, or the training curves."""
        run = self._trainingRun
        if run is None:
            return
        chart = run.roc_chart_node if checked and run.roc_chart_node is not None else run.curves.chart_node
        self._showTrainingChart(chart)

    def onCancelTraining(self) -> None:
        if self._trainingRun is not None:
            self._trainingRun.cancel(wait=False)  # the timer keeps polling until the worker has exited
            self.ui.trainingStatusLabel.text = self._trainingRun.status
            self.ui.cancelTrainingButton.enabled = False

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
        self._curation = None

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

    # -- models (LymphNodeClassifierLib.model_registry) ---------------------------------

    @staticmethod
    def modelsFolder() -> str:
        """The user's model folder (LYMPHNODECLASSIFIER_MODELS, else the platform's user data folder)."""
        from LymphNodeClassifierLib import model_registry

        return str(model_registry.models_folder())

    def listModels(self) -> list:
        """Bundled and trained models (model_registry.ModelEntry); unreadable files carry their error."""
        from LymphNodeClassifierLib import model_registry

        return model_registry.list_models(self.modelsFolder())

    def activeModelPath(self) -> str:
        """The model used when none is chosen: the active one, else the bundled default ("" if none)."""
        from LymphNodeClassifierLib import model_registry

        path = model_registry.resolve_model(self.modelsFolder())
        return str(path) if path is not None else ""

    def setActiveModel(self, path: str) -> None:
        from LymphNodeClassifierLib import model_registry

        model_registry.set_active_model(self.modelsFolder(), path)

    def resolvedModelPath(self, modelPath: str):
        """The parameter node's model path, with "" meaning the active model (None: ClassificationLogic's default)."""
        return modelPath or self.activeModelPath() or None

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
            model_path=self.resolvedModelPath(parameterNode.modelPath),
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

    # -- curation (LymphNodeClassifierLogic.curation_logic) ------------------------------

    @property
    def curation(self):
        """The Curation tab's CurationLogic (created on first use, on Slicer's scene)."""
        if self._curation is None:
            from LymphNodeClassifierLogic.curation_logic import CurationLogic

            self._curation = CurationLogic(slicer.mrmlScene, classification=self.classification)
        return self._curation

    def curationIsOpen(self) -> bool:
        return self._curation is not None and self._curation.is_open

    def openDataset(self, folder: str):
        """Open a dataset folder for curation; returns the table node of its nodes."""
        return self.curation.open_dataset(folder)

    def loadCurationCase(self, caseId: str, modelPath: str = ""):
        """Load a dataset case into the scene and classify it with the chosen (or active) model."""
        return self.curation.load_case(caseId, model_path=self.resolvedModelPath(modelPath))

    def closeCuration(self) -> None:
        """Release the open dataset (its curation lock) and remove the curation nodes."""
        if self._curation is not None:
            self._curation.cleanup()

    def curationSceneClosed(self) -> None:
        """The scene was closed: the curation nodes are gone, so the dataset is released too."""
        self.closeCuration()

    # -- training (LymphNodeClassifierLogic.training_process) ----------------------------

    @staticmethod
    def trainingOptions(parameterNode) -> dict:
        """The parameter node's training options as train_worker options (TrainingConfig field names)."""
        options = {field: getattr(parameterNode, parameter) for parameter, field in TRAINING_PARAMETERS.items()}
        size, spacing = TRAIN_PATCHES[parameterNode.trainPatch]
        options["patch_size"], options["spacing_mm"] = size, (spacing,) * 3
        # the shift range is set in pixels of the study's 0.79 mm patch: keep its millimetres on coarser pixels
        options["translation_px"] = round(parameterNode.trainTranslationPx * TRAIN_PATCHES[TRAIN_PATCH_DEFAULT][1] / spacing, 2)
        if parameterNode.trainSplit == TRAIN_SPLIT_KFOLD:
            options["folds"] = int(parameterNode.trainFolds)
        else:
            options["split_fractions"] = (0.8, 0.1, 0.1)
        return options

    def startTraining(self, parameterNode, previousRun=None):
        """Start a background training run on the parameter node's dataset folder; returns the TrainingRun.

        The new model goes into the model folder; the previous run's curve and result nodes are removed.
        """
        from LymphNodeClassifierLib.errors import InputError
        from LymphNodeClassifierLogic.training_process import TrainingRun

        folder = parameterNode.curationDatasetFolder
        if not folder or not os.path.isfile(os.path.join(folder, "dataset.json")):
            raise InputError(f"There is no dataset.json in '{folder}'; choose a dataset folder on the Curation tab first.")
        if previousRun is not None:
            for node in previousRun.curves.nodes() + [previousRun.results_node] + previousRun.roc_nodes:
                if node is not None and node.GetScene() is slicer.mrmlScene:
                    slicer.mrmlScene.RemoveNode(node)
        run = TrainingRun(slicer.mrmlScene, folder, self.modelsFolder(), self.trainingOptions(parameterNode))
        run.start()
        return run

    def startSuspectSearch(self):
        """Start the suspect-label search of the open dataset in a background process; returns the SuspectsProcess."""
        from LymphNodeClassifierLib.errors import InputError
        from LymphNodeClassifierLogic.training_process import SuspectsProcess

        if not self.curationIsOpen():
            raise InputError("No dataset is open; open a dataset folder on the Curation tab first.")
        process = SuspectsProcess(self.curation.session.folder)  # the dataset shown, not the path box's text
        process.start()
        return process

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
    """Runs, inside Slicer, the same scenarios as the headless pytest suites: the sample case, a tiny
    training run and a suspect-label search, each in a background process (LymphNodeClassifierLogic.training_process)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SampleCaseScenarios()
        self.setUp()
        self.test_TrainingProcessScenario()
        self.setUp()
        self.test_SuspectsProcessScenario()

    def test_SampleCaseScenarios(self):
        """Load the bundled sample case, classify it, check segments, table rows and a re-run."""
        self.delayDisplay("Running the sample case scenarios")
        from LymphNodeClassifierLogic import scenarios

        scenarios.run_all()
        self.delayDisplay("Test passed")

    def test_TrainingProcessScenario(self):
        """Train a tiny model in a background process: live curves, results table, model installed, make active."""
        self.delayDisplay("Running a tiny training in a background process")
        from LymphNodeClassifierLogic import training_process

        result = training_process.scenario_training_process()
        self.delayDisplay(f"Test passed: {result['model']} after {result['epochs_run']} epochs")

    def test_SuspectsProcessScenario(self):
        """Rank a noisy phantom cohort's labels in a background process: suspects.csv lists every node once."""
        self.delayDisplay("Running a suspect-label search in a background process")
        from LymphNodeClassifierLogic import training_process

        result = training_process.scenario_suspects_process()
        self.delayDisplay(f"Test passed: {result['nodes']} nodes ranked, {result['flagged']} flagged")
