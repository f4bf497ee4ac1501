"""LymphNodeClassifier: classify lymph nodes on CT as metastatic or benign.

This file only holds what Slicer needs to show the module: the module description, the parameter
node, the Widget (wiring between the .ui file, the parameter node and the logic) and the self-test.
All computation lives in the `LymphNodeClassifierLogic` package (MRML, no Qt) and the
`LymphNodeClassifierLib` package (pure Python), which are imported lazily so that the module loads
even before PyTorch is installed.
"""

import hashlib
import logging
import pathlib
import sys
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

# The option lists of the parameter node and the panel's decisions live in the Qt-free controller
# (LymphNodeClassifierLogic/controller.py, shared with the browser review station); that module
# imports nothing heavy, so the module file loads before PyTorch is installed.
import LymphNodeClassifierLogic.controller as panel  # binds `panel` only: `LymphNodeClassifierLogic` is the Logic class below
from LymphNodeClassifierLogic.controller import (
    DEVICE_NAMES,
    TRAIN_ARCHITECTURES,
    TRAIN_FUSIONS,
    TRAIN_PATCHES,
    TRAIN_SPLITS,
    TRAIN_VIEWS,
    WINDOW_PRESET_NAMES,
)


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
The intensity window only changes how the CT is <b>displayed</b>: the model always classifies at the window
it was trained with (its model card's). Next to the model chooser the panel shows what the model's card says
it is for; the bundled default model is a demonstration trained on synthetic CT phantoms, not a diagnostic device.
The <b>Curation</b> tab opens a dataset folder to review and relabel its nodes (every edit is saved at once,
with an audit journal) and to train a new model in the background, compare it with the active model and
the short-axis size rule on the same test set, and make it the active model.
See the <a href="https://github.com/LymphNodeClassifier/SlicerLymphNodeClassifier#readme">module documentation</a>.
""")
        # Register the sample case with the Sample Data module once Slicer has started, as the template does.
        slicer.app.connect("startupCompleted()", registerSampleData)
        self.parent.acknowledgementText = _("""
Built on the 3D Slicer scripted module template (Jean-Christophe Fillion-Robin, Kitware Inc.,
Andras Lasso, PerkLab, and Steve Pieper, Isomics, Inc.) and the Slicer PyTorch extension.
""")


#
# Register the sample case in the Sample Data module
#


def registerSampleData():
    """Add the bundled sample case (a synthetic CT with masked nodes) to the Sample Data module."""
    import SampleData

    iconsPath = os.path.join(os.path.dirname(__file__), "Resources", "Icons")
    category = "LymphNodeClassifier"
    if hasattr(SampleData.SampleDataLogic, "registerCustomSampleDataCategory"):  # Slicer >= 5.10
        SampleData.SampleDataLogic.registerCustomSampleDataCategory(category, title=_("Lymph Node Classifier"))
    # The case ships with the extension: its files are registered as file:// URIs (SampleDataLogic.downloadFile
    # copies them into the cache with urllib), so SampleData.downloadSample(...) works from scripts. Its
    # loadFileProperties are common to all files (SampleData.downloadFromURL's docstring), so the label map can't
    # be loaded as a labelmap there: scripts get the CT node, the labels file is only copied (loadFiles False).
    # The Sample Data panel's button calls the custom downloader instead: the module panel's own Load sample case,
    # which loads both as the panel expects and tells the open panel about them.
    imagesPath = os.path.join(os.path.dirname(__file__), "Resources", "SampleData", "images")
    fileNames = ["P0001-S1_ct.nrrd", "P0001-S1_labels.nrrd"]
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category=category,
        sampleName="LymphNodeClassifierSampleCase",
        uris=[pathlib.Path(imagesPath, name).as_uri() for name in fileNames],
        fileNames=["LymphNodeClassifier-" + name for name in fileNames],
        # SampleDataLogic.downloadFile reuses a cached file of that name unless its checksum differs (an older copy)
        checksums=["SHA256:" + hashlib.sha256(pathlib.Path(imagesPath, name).read_bytes()).hexdigest() for name in fileNames],
        nodeNames=["P0001-S1_ct", "P0001-S1_labels"],
        loadFileTypes=["VolumeFile", "VolumeFile"],
        loadFiles=[True, False],
        thumbnailFileName=os.path.join(iconsPath, "LymphNodeClassifier.png"),
        customDownloader=lambda source: loadSampleCaseInPanel(),
    )


def loadSampleCaseInPanel():
    """The Sample Data button: the module panel's Load sample case (the panel then shows the loaded nodes)."""
    slicer.util.selectModule("LymphNodeClassifier")
    return slicer.modules.lymphnodeclassifier.widgetRepresentation().self().onLoadSampleCase()


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
    train* - the Training tab's options (see controller.TRAINING_PARAMETERS; trainSplit "80/10/10" or "k-fold"
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
    trainFusion: Annotated[str, Choice(TRAIN_FUSIONS)] = "none"
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
    trainPatch: Annotated[str, Choice(list(TRAIN_PATCHES))] = "64 px at 0.79 mm (study)"  # controller.TRAIN_PATCH_DEFAULT


#
# LymphNodeClassifierWidget
#


class LymphNodeClassifierWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Wiring only: Qt signals -> controller calls, controller state -> widgets.

    Every decision (what an edit applies to, what is enabled, job states, messages) is made by
    `LymphNodeClassifierLogic.controller.PanelController`; this class connects the .ui to it.
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.controller = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingModelWidgets = False
        self._choosingModelFile = False  # "Model file..." chosen in the model combo box (a view state: not saved)
        self._pollTimer = None
        self._plotViewNode = None
        self._shownLayers = None
        self._shownSelection = None
        self._shownTrainedModel = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LymphNodeClassifier.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = LymphNodeClassifierLogic()
        self.controller = self.logic.controller
        self.controller.on_job_error = self._showJobError
        # One timer polls both background processes (training, suspect search); no training happens in Slicer itself.
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(panel.POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollTimer)
        self.controller.add_listener(self._render)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # The model path is a plain string ("" = the active model), which the parameter node wrapper
        # can't bind to a ctkPathLineEdit, so the model widgets are wired by hand.
        self._populateModelChoosers()
        self.ui.modelChooserComboBox.connect("currentIndexChanged(int)", self.onModelChosen)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathEdited)

        c = self.controller
        self.ui.loadSampleCaseButton.connect("clicked(bool)", self.onLoadSampleCase)
        self.ui.classifyButton.connect("clicked(bool)", self.onClassifyButton)
        self.ui.resultsTableView.connect("selectionChanged()", self.onResultSelectionChanged)

        # Curation tab
        self.ui.datasetFolderPathLineEdit.connect("currentPathChanged(QString)", self.onDatasetFolderEdited)
        self.ui.openDatasetButton.connect("clicked(bool)", self.onOpenDataset)
        self.ui.curationTableView.connect("selectionChanged()", self.onCurationSelectionChanged)
        self.ui.loadCaseButton.connect("clicked(bool)", self.onLoadCase)
        self.ui.markMetastaticButton.connect("clicked(bool)", lambda: self._call(lambda: c.relabel(1), _("Failed to relabel the node.")))
        self.ui.markBenignButton.connect("clicked(bool)", lambda: self._call(lambda: c.relabel(0), _("Failed to relabel the node.")))
        self.ui.excludeNodeButton.connect("clicked(bool)", lambda: self._call(
            lambda: c.exclude_node(self.ui.excludeReasonLineEdit.text), _("Failed to exclude the node.")))
        self.ui.includeNodeButton.connect("clicked(bool)", lambda: self._call(c.include_node, _("Failed to include the node.")))
        self.ui.excludeCaseButton.connect("clicked(bool)", lambda: self._call(
            lambda: c.exclude_case(self.ui.excludeReasonLineEdit.text), _("Failed to exclude the case.")))
        self.ui.includeCaseButton.connect("clicked(bool)", lambda: self._call(c.include_case, _("Failed to include the case.")))
        self.ui.saveNodeNoteButton.connect("clicked(bool)", lambda: self._call(
            lambda: c.save_node_note(self.ui.noteLineEdit.text), _("Failed to save the note.")))
        self.ui.saveCaseNoteButton.connect("clicked(bool)", lambda: self._call(
            lambda: c.save_case_note(self.ui.noteLineEdit.text), _("Failed to save the note.")))
        self.ui.reviewButton.connect("clicked(bool)", self.onReview)
        self.ui.reviewTableView.connect("selectionChanged()", self.onReviewSelectionChanged)
        self.ui.suspectsTableView.connect("selectionChanged()", self.onSuspectSelectionChanged)
        self.ui.findSuspectsButton.connect("clicked(bool)", self.onFindSuspects)
        self.ui.cancelSuspectsButton.connect("clicked(bool)", lambda: self._call(
            lambda: c.cancel_suspect_search(wait=False), _("Failed to stop the suspect search.")))

        # Training sub-tab
        self.ui.startTrainingButton.connect("clicked(bool)", self.onStartTraining)
        self.ui.showRocCheckBox.connect("toggled(bool)", c.set_show_roc)
        self.ui.cancelTrainingButton.connect("clicked(bool)", lambda: self._call(
            lambda: c.cancel_training(wait=False), _("Failed to cancel the training.")))
        self.ui.makeActiveButton.connect("clicked(bool)", self.onMakeActive)
        self.ui.trainedModelComboBox.connect("currentIndexChanged(int)", self.onTrainedModelChosen)

        self.initializeParameterNode()
        self._render(self.controller.state())

    def cleanup(self) -> None:
        if self._pollTimer is not None:
            self._pollTimer.stop()
        if self.controller is not None:
            self.controller.cleanup()  # cancels and waits for every worker: none is ever left running
        self.setParameterNode(None)  # disconnects the GUI from the parameter node, removes its observer
        self._removePlotViewNode()
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
        self._removePlotViewNode()  # a singleton would outlive the close, owned by a removed parameter node
        self._choosingModelFile = False

    def onSceneEndClose(self, caller, event) -> None:
        self._shownLayers = None
        self.controller.scene_closed()
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
            self._parameterNodeGuiTag = None
            if self.hasObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified):  # exit() removed it
                self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" dynamic property in the .ui are bound here.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        """Parameter node -> controller (the controller's state then redraws the panel)."""
        parameters = self._parameterNode
        if not parameters:
            return
        low, high, editable = panel.window_fields(parameters.windowPreset, parameters.windowLow, parameters.windowHigh)
        self.ui.windowLowSpinBox.enabled = editable
        self.ui.windowHighSpinBox.enabled = editable
        if (parameters.windowLow, parameters.windowHigh) != (low, high):
            with slicer.util.NodeModify(parameters):
                parameters.windowLow, parameters.windowHigh = low, high
        self.ui.trainFoldsSpinBox.enabled = parameters.trainSplit == panel.TRAIN_SPLIT_KFOLD
        if not parameters.curationDatasetFolder and self.ui.datasetFolderPathLineEdit.currentPath:
            # ctkPathLineEdit::retrieveHistory (run by setSettingKey) shows the last folder used, with its signals
            # blocked: a parameter node that has none takes it, rather than wiping it.
            parameters.curationDatasetFolder = self.ui.datasetFolderPathLineEdit.currentPath
        if self.ui.datasetFolderPathLineEdit.currentPath != parameters.curationDatasetFolder:
            self.ui.datasetFolderPathLineEdit.currentPath = parameters.curationDatasetFolder
        self._updateModelWidgets()
        self.controller.set_inputs(parameters.inputCT, parameters.inputLabels)
        self.controller.set_model(parameters.modelPath)
        self.controller.set_dataset_folder(parameters.curationDatasetFolder)
        self.controller.set_gradcam_opacity(parameters.gradcamOpacity)

    # -- controller state -> widgets -----------------------------------------------------

    def _render(self, state) -> None:
        """Show a controller state; sets a view's node only when it changed (setMRMLTableNode re-emits selectionChanged)."""
        if state.polling and not self._pollTimer.isActive():
            self._pollTimer.start()  # first: whatever fails below, a started worker stays watched
        p = panel
        buttons = {
            p.CLASSIFY: [self.ui.classifyButton], p.LOAD_SAMPLE: [self.ui.loadSampleCaseButton],
            p.OPEN_DATASET: [self.ui.openDatasetButton], p.LOAD_CASE: [self.ui.loadCaseButton],
            p.EDIT_NODE: [self.ui.markMetastaticButton, self.ui.markBenignButton, self.ui.excludeNodeButton,
                          self.ui.includeNodeButton, self.ui.saveNodeNoteButton],
            p.EDIT_CASE: [self.ui.excludeCaseButton, self.ui.includeCaseButton, self.ui.saveCaseNoteButton],
            p.REVIEW: [self.ui.reviewButton], p.FIND_SUSPECTS: [self.ui.findSuspectsButton],
            p.CANCEL_SUSPECTS: [self.ui.cancelSuspectsButton], p.START_TRAINING: [self.ui.startTrainingButton],
            p.CANCEL_TRAINING: [self.ui.cancelTrainingButton], p.TRAINING_OPTIONS: [self.ui.trainingOptionsCollapsibleButton],
            p.SHOW_ROC: [self.ui.showRocCheckBox],
        }
        for action, widgets in buttons.items():
            for widget in widgets:
                widget.enabled = state.enabled[action]
        self.ui.classifyButton.toolTip = (_("Classify every masked lymph node of the CT") if state.has_inputs else
                                          _("Select a CT volume and the label map or segmentation of its lymph nodes"))
        self.ui.progressBar.visible = bool(state.busy)
        self.ui.intendedUseLabel.text = state.intended_use

        # Classify results: messages (labels resampled, field of view grown, window) and warnings
        self.ui.resultsSummaryLabel.text = "\n".join(list(state.messages) + [_("Warning: {w}").format(w=w) for w in state.warnings])
        self._setTable(self.ui.resultsTableView, state.results_table)
        self.ui.resultsCollapsibleButton.enabled = state.results_table is not None
        self.ui.gradcamOpacitySliderWidget.enabled = state.layers is not None and state.layers.foreground is not None
        if state.layers is not None and state.layers is not self._shownLayers:
            layers = state.layers
            slicer.util.setSliceViewerLayers(background=layers.background, foreground=layers.foreground,
                                             foregroundOpacity=layers.foreground_opacity, label=layers.label, fit=layers.fit)
        self._shownLayers = state.layers

        # Curation tab
        self._setTable(self.ui.curationTableView, state.cases_table)
        self._setTable(self.ui.reviewTableView, state.review_table)
        self._setTable(self.ui.suspectsTableView, state.suspects_table)
        self.ui.suspectsCollapsibleButton.visible = state.suspects_table is not None
        self.ui.datasetSummaryLabel.text = state.dataset_summary
        self.ui.curationStatusLabel.text = state.curation_status
        self.ui.suspectsStatusLabel.text = state.suspects.status
        if state.selected != self._shownSelection:
            self._shownSelection = state.selected
            if state.selected_row >= 0 and self._selectedRow(self.ui.curationTableView) != state.selected_row:
                proxy = self.ui.curationTableView.sortFilterProxyModel()
                self.ui.curationTableView.selectRow(proxy.mapFromSource(proxy.sourceModel().index(state.selected_row, 0)).row())
            info = self.controller.selected_info()
            if info is not None:
                self.ui.noteLineEdit.text = info["note"]
                self.ui.excludeReasonLineEdit.text = info["reason"].replace("case: ", "", 1)

        # Training tab
        self.ui.trainingProgressBar.visible = state.training.active
        self.ui.trainingProgressBar.value = int(round(100 * state.training.progress))
        self.ui.trainingStatusLabel.text = state.training.status
        self._showChart(state.training_chart)
        self._setTable(self.ui.trainingResultsTableView, state.training_results)
        if self.ui.showRocCheckBox.checked != state.show_roc:
            self.ui.showRocCheckBox.checked = state.show_roc
        if state.trained_model != self._shownTrainedModel:
            self._shownTrainedModel = state.trained_model
            if state.trained_model:
                self._populateModelChoosers()
                index = self._findPath(self.ui.trainedModelComboBox, state.trained_model)
                if index >= 0:
                    self.ui.trainedModelComboBox.currentIndex = index

    @staticmethod
    def _findPath(comboBox, path) -> int:
        """The index of the item whose data is the file `path` (compared as real paths: the model folder may be given
        through a symbolic link or with another spelling), -1 if none."""
        wanted = os.path.realpath(str(path))
        for index in range(comboBox.count):
            data = comboBox.itemData(index)
            if data and os.path.realpath(str(data)) == wanted:
                return index
        return -1

    @staticmethod
    def _setTable(tableView, tableNode) -> None:
        if tableView.mrmlTableNode() is not tableNode:
            tableView.setMRMLTableNode(tableNode)

    def _showChart(self, chartNode) -> None:
        if chartNode is None or self._parameterNode is None:  # no parameter node (the scene is closing): no owner
            return
        if self._plotViewNode is None or self._plotViewNode.GetScene() is None:
            self._plotViewNode = self._addPlotViewNode()
            self.ui.trainingPlotWidget.setMRMLPlotViewNode(self._plotViewNode)
        if self._plotViewNode.GetPlotChartNodeID() != chartNode.GetID():
            self._plotViewNode.SetPlotChartNodeID(chartNode.GetID())

    def _addPlotViewNode(self):
        """The panel's own plot view: owned by the parameter node, so the layout manager makes no second widget for it
        (qMRMLLayoutViewFactory::onNodeAdded takes only view nodes without a parent layout node), and not following
        the application's chart selection (another module's ShowChartInLayout would replace the training curves)."""
        viewNode = slicer.vtkMRMLPlotViewNode()
        viewNode.SetName("LymphNodeClassifier training plot view")
        viewNode.SetLayoutName("LymphNodeClassifierTrainingPlot")  # the singleton tag: no layout uses this name
        viewNode.SetLayoutLabel("LNC")
        viewNode.SetDoPropagatePlotChartSelection(False)
        viewNode.SetSaveWithScene(False)
        viewNode.SetAndObserveParentLayoutNodeID(self._parameterNode.parameterNode.GetID())  # set before AddNode, the factory looks then
        return slicer.mrmlScene.AddNode(viewNode)  # a singleton: the scene's node of that tag if one is left

    def _removePlotViewNode(self) -> None:
        if self._plotViewNode is not None and self._plotViewNode.GetScene() is not None:
            self._plotViewNode.GetScene().RemoveNode(self._plotViewNode)
        self._plotViewNode = None

    def onPollTimer(self) -> None:
        if not self.controller.poll():
            self._pollTimer.stop()

    def _showJobError(self, message: str, details: str) -> None:
        slicer.util.errorDisplay(message, detailedText=details)

    def _call(self, action, failure: str):
        """Run a controller call; a user's mistake (InputError) shows its one line, anything else the details."""
        from LymphNodeClassifierLib.errors import InputError

        try:
            with slicer.util.WaitCursor():
                return action()
        except InputError as error:
            slicer.util.errorDisplay(str(error))
        except Exception as error:
            logging.exception(failure)
            slicer.util.errorDisplay(f"{failure} {error}", detailedText=traceback.format_exc())
        return None

    # -- model choice ------------------------------------------------------------------

    def _populateModelChoosers(self) -> None:
        """Fill both model lists from the model folder: the Classify tab's and the Training tab's."""
        self._updatingModelWidgets = True
        try:
            entries = self.controller.models()
            activePath = self.controller.active_model_path()
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
            self.ui.modelsFolderLabel.text = self.controller.models_folder()
        finally:
            self._updatingModelWidgets = False
        self.controller.models_changed()
        self.onTrainedModelChosen()
        if self._parameterNode:
            self._updateModelWidgets()

    def _updateModelWidgets(self) -> None:
        """Show the parameter node's model path in the model combo box and path field."""
        if self._updatingModelWidgets or not self._parameterNode:
            return
        self._updatingModelWidgets = True
        try:
            modelPath = self._parameterNode.modelPath
            otherFileIndex = self.ui.modelChooserComboBox.count - 1
            if modelPath:
                index = self._findPath(self.ui.modelChooserComboBox, modelPath)
                if index < 0:  # a file that is not in the model folder
                    index = otherFileIndex
            else:  # "" is the active model, unless "Model file..." was chosen and no path is entered yet
                index = otherFileIndex if self._choosingModelFile else 0
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
        # "Model file..." (no item data) takes the path field, which stays enabled while it is empty.
        self._choosingModelFile = path is None
        if self._choosingModelFile:
            path = self.ui.modelPathLineEdit.currentPath
        self._parameterNode.modelPath = path
        self._updateModelWidgets()  # an unchanged path sends no Modified event

    def onModelPathEdited(self, path: str) -> None:
        if self._updatingModelWidgets or not self._parameterNode:
            return
        self._parameterNode.modelPath = path

    def onTrainedModelChosen(self, index: int = -1) -> None:
        if self._updatingModelWidgets:
            return
        self.ui.makeActiveButton.enabled = self.controller.can_make_active(self.ui.trainedModelComboBox.currentData)

    def onMakeActive(self) -> None:
        path = self.ui.trainedModelComboBox.currentData
        if self._call(lambda: self.controller.make_active(path) or True, _("Failed to make the model active.")):
            self.ui.trainingStatusLabel.text = _("Active model: {path}").format(path=path)
        self._populateModelChoosers()

    # -- Classify tab ------------------------------------------------------------------

    def onLoadSampleCase(self):
        """Load the bundled sample case as the inputs; returns (CT node, label map node), None if it failed."""
        nodes = self._call(self.controller.load_sample_case, _("Failed to load the sample case."))
        if nodes is not None:
            self._parameterNode.inputCT, self._parameterNode.inputLabels = nodes
        return nodes

    def onClassifyButton(self) -> None:
        if not self.ensurePythonDependencies():
            return
        parameters = self._parameterNode
        self.ui.progressBar.value = 0
        outputs = self._call(lambda: self.controller.classify(
            window=(parameters.windowLow, parameters.windowHigh), device=parameters.device, progress=self._onProgress),
            _("Classification failed."))
        if outputs is not None:
            self.logic.storeOutputs(parameters, outputs)

    def _onProgress(self, fraction: float, message: str = "") -> None:
        self.ui.progressBar.value = int(round(100 * max(0.0, min(1.0, float(fraction)))))
        self.ui.progressBar.format = f"{message} %p%" if message else "%p%"
        slicer.app.processEvents()  # the controller's busy state has disabled the other buttons

    def onResultSelectionChanged(self) -> None:
        self._jumpTo(self.controller.result_centroid(self._selectedRow(self.ui.resultsTableView)))

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
        if centroidRAS is not None:
            slicer.modules.markups.logic().JumpSlicesToLocation(*centroidRAS, True)

    # -- Curation tab ------------------------------------------------------------------

    def onDatasetFolderEdited(self, path: str) -> None:
        if self._parameterNode and self._parameterNode.curationDatasetFolder != path:
            self._parameterNode.curationDatasetFolder = path

    def onOpenDataset(self) -> None:
        if not self.ensurePythonDependencies():
            return
        if self._call(lambda: self.controller.open_dataset(self.ui.datasetFolderPathLineEdit.currentPath), _("Failed to open the dataset.")):
            self.ui.datasetFolderPathLineEdit.addCurrentPathToHistory()

    def onCurationSelectionChanged(self) -> None:
        self._jumpTo(self._call(lambda: self.controller.select_row(self._selectedRow(self.ui.curationTableView)),
                                _("Failed to select the node.")))

    def onLoadCase(self) -> None:
        if self.ensurePythonDependencies():
            self._call(self.controller.load_selected_case, _("Failed to load the case."))

    def onSuspectSelectionChanged(self) -> None:
        """A suspect click selects that node (the next edit applies to it) and loads its case."""
        row = self._selectedRow(self.ui.suspectsTableView)
        if row >= 0 and self.ensurePythonDependencies():
            self._jumpTo(self._call(lambda: self.controller.select_suspect(row), _("Failed to load the case.")))

    def onReviewSelectionChanged(self) -> None:
        self._jumpTo(self._call(lambda: self.controller.select_review(self._selectedRow(self.ui.reviewTableView)),
                                _("Failed to select the node.")))

    def onReview(self) -> None:
        if self._call(lambda: self.controller.review(progress=lambda done, total: slicer.app.processEvents()),
                      _("Failed to check the dataset.")) is not None:
            self.ui.reviewCollapsibleButton.collapsed = False

    def onFindSuspects(self) -> None:
        if self.ensurePythonDependencies():  # the worker needs PyTorch, scikit-learn and cleanlab
            self._call(self.controller.start_suspect_search, _("Failed to start the suspect search."))

    # -- Training tab --------------------------------------------------------------------

    def onStartTraining(self) -> None:
        if not self.ensurePythonDependencies():
            return
        options = panel.training_options(self._parameterNode)
        self._call(lambda: self.controller.start_training(options), _("Failed to start the training."))

    # -- dependencies ------------------------------------------------------------------

    def ensurePythonDependencies(self) -> bool:
        """Make sure a recent enough PyTorch (through the PyTorch extension) and Resources/requirements.txt are installed.

        Returns False (after telling the user why) when they are missing and were not installed.
        """
        from LymphNodeClassifierLogic import dependencies

        torch = dependencies.torch_status()
        if not torch.ok:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                slicer.util.errorDisplay(_(
                    "Lymph Node Classifier needs the PyTorch extension. Install 'PyTorch' from the "
                    "Extensions Manager, restart Slicer, then press Classify again."))
                return False
            if torch.too_old and "torch" in sys.modules:  # an imported torch can't be replaced in this session
                slicer.util.errorDisplay(torch.message())
                return False
            if slicer.app.testingEnabled():  # installTorch skips its confirmation in testing mode: never download unasked
                slicer.util.errorDisplay(torch.message())
                return False
            try:
                installed = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=True, torchVersionRequirement=f">={dependencies.MINIMUM_TORCH_VERSION}")
            except Exception as error:  # pip's CalledProcessError, an ImportError of the new torch, ...
                logging.exception("PyTorch installation failed")
                slicer.util.errorDisplay(_("PyTorch could not be installed: {error}").format(error=error),
                                         detailedText=traceback.format_exc())
                return False
            if installed is None or not dependencies.torch_status().ok:
                slicer.util.errorDisplay(dependencies.torch_status().message())
                return False
            self._populateModelChoosers()  # the model cards can be read now
        try:
            dependencies.install_requirements(self.resourcePath("requirements.txt"), requester="Lymph Node Classifier")
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
    """Thin Slicer-facing wrapper: the parameter node and the panel's controller on Slicer's scene.

    The computation and every decision live in the `LymphNodeClassifierLogic` package (imported
    lazily, because it needs PyTorch). Note: inside this file the name `LymphNodeClassifierLogic`
    is this class, so the package is only ever reached with `from LymphNodeClassifierLogic import ...`.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._controller = None

    def getParameterNode(self):
        return LymphNodeClassifierParameterNode(super().getParameterNode())

    @property
    def controller(self):
        """The panel's PanelController on Slicer's scene (created on first use)."""
        if self._controller is None:
            self._controller = panel.PanelController(slicer.mrmlScene)
        return self._controller

    @property
    def classification(self):
        """The package's ClassificationLogic (it caches loaded models)."""
        return self.controller.classification

    @staticmethod
    def moduleDir() -> str:
        return os.path.dirname(os.path.abspath(__file__))

    @staticmethod
    def storeOutputs(parameterNode, outputs) -> None:
        """Keep a classification's output nodes in the parameter node (saved with the scene)."""
        with slicer.util.NodeModify(parameterNode):
            parameterNode.outputSegmentation = outputs.segmentation_node
            parameterNode.outputTable = outputs.table_node
            parameterNode.outputGradCam = outputs.gradcam_node

    def classify(self, parameterNode, progress=None):
        """Classify the nodes selected in `parameterNode` (for scripts); stores the output nodes in it."""
        result = self.classification.classify(
            parameterNode.inputCT,
            parameterNode.inputLabels,
            model_path=self.controller.resolved_model_path(parameterNode.modelPath),
            window=(parameterNode.windowLow, parameterNode.windowHigh),
            device=parameterNode.device,
            gradcam=True,
            progress=progress,
        )
        self.storeOutputs(parameterNode, result)
        return result

    def extractNodeTable(self, ctVolumeNode, labelsNode):
        """Table of node measurements (no model needed)."""
        return self.classification.extract_node_table(ctVolumeNode, labelsNode)

    def loadSampleCase(self):
        """Load the first case of the bundled sample dataset; returns (CT node, label map node)."""
        return self.controller.load_sample_case()


#
# LymphNodeClassifierTest
#


class LymphNodeClassifierTest(ScriptedLoadableModuleTest):
    """Inside Slicer ("Reload and Test", the extension build machines): presses the panel's real buttons
    with click(), then runs the scenarios shared with the headless pytest suites."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        reason = self._missingDependencies()
        if reason:
            self.delayDisplay(f"Lymph Node Classifier tests skipped: {reason}")
            logging.warning(f"Lymph Node Classifier tests skipped: {reason}")
            return
        for test in (self.test_ClassifyButton, self.test_TrainingTabStartAndCancel, self.test_CurationRelabelsASuspect,
                     self.test_SampleCaseScenarios, self.test_TrainingProcessScenario):
            self.setUp()
            test()

    def _requireDependencies(self) -> None:
        """Each test_* on its own (ctest runs them one by one through unittest): skipped, saying why, without them."""
        reason = self._missingDependencies()
        if reason:
            self.skipTest(reason)

    def _missingDependencies(self) -> str:
        """'' when PyTorch and the requirements are there (installed now if Slicer allows), else why not."""
        from LymphNodeClassifierLogic import dependencies

        widget = self._widget()
        # "Reload and Test" asks to install what is missing; in testing mode (the extension build machines)
        # nothing is installed (PyTorchUtils would download PyTorch unasked there): then the tests skip.
        if not slicer.app.testingEnabled() and (not dependencies.torch_status().ok or dependencies.missing_requirements(
                dependencies.read_requirements(widget.resourcePath("requirements.txt")))):
            widget.ensurePythonDependencies()
        torch = dependencies.torch_status()
        if not torch.ok:
            return torch.message()
        missing = dependencies.missing_requirements(dependencies.read_requirements(widget.resourcePath("requirements.txt")))
        if missing:
            return "these Python packages are not installed: " + ", ".join(str(r) for r in missing)
        return ""

    @staticmethod
    def _widget():
        slicer.util.selectModule("LymphNodeClassifier")
        return slicer.modules.lymphnodeclassifier.widgetRepresentation().self()

    def _waitFor(self, condition, timeout: float, what: str) -> None:
        import time

        deadline = time.monotonic() + timeout
        while not condition() and time.monotonic() < deadline:
            slicer.app.processEvents()  # the widget's poll timer runs meanwhile
            time.sleep(0.05)
        self.assertTrue(condition(), f"timed out after {timeout:.0f} s waiting for {what}")

    def test_ClassifyButton(self):
        """Load sample case, Classify: one table row and one segment per node, a Grad-CAM, the label layer emptied."""
        self._requireDependencies()
        self.delayDisplay("Pressing Load sample case and Classify")
        from LymphNodeClassifierLib.dataset import Dataset
        from LymphNodeClassifierLogic import scenarios

        widget = self._widget()
        widget.ui.loadSampleCaseButton.click()
        self.assertTrue(widget.ui.classifyButton.enabled, "Classify stays disabled after loading the sample case")
        widget.ui.classifyButton.click()
        dataset = Dataset.load(scenarios.SAMPLE_DATASET)
        expected = len(dataset.nodes_of(dataset.cases[0].case_id))
        table = widget.ui.resultsTableView.mrmlTableNode()
        self.assertIsNotNone(table, "no results table after Classify")
        self.assertEqual(table.GetNumberOfRows(), expected)
        parameters = widget._parameterNode
        self.assertEqual(parameters.outputSegmentation.GetSegmentation().GetNumberOfSegments(), expected)
        self.assertGreater(slicer.util.arrayFromVolume(parameters.outputGradCam).max(), 0.0, "the Grad-CAM is empty")
        composite = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        self.assertIsNone(composite.GetLabelVolumeID(), "the input label map still covers the segments")
        self.assertEqual(composite.GetForegroundVolumeID(), parameters.outputGradCam.GetID())
        self.assertIn(_("classified"), widget.ui.resultsSummaryLabel.text)
        self.assertTrue(widget.ui.intendedUseLabel.text, "the model's intended use is not shown")
        self.delayDisplay("Test passed")

    def test_TrainingTabStartAndCancel(self):
        """Start a training from the Training tab, Cancel it: the worker ends and no model is installed."""
        self._requireDependencies()
        import glob
        import tempfile

        from LymphNodeClassifierLogic import controller, training_process

        self.delayDisplay("Pressing Start training, then Cancel")
        widget = self._widget()
        with tempfile.TemporaryDirectory(prefix="lymphnode-selftest-") as tmp:
            previous = os.environ.get("LYMPHNODECLASSIFIER_MODELS")
            os.environ["LYMPHNODECLASSIFIER_MODELS"] = os.path.join(tmp, "models")  # the user's models stay untouched
            try:
                cohort = training_process.make_tiny_cohort(os.path.join(tmp, "cohort"))
                widget.ui.datasetFolderPathLineEdit.currentPath = str(cohort)
                widget.ui.trainPatchComboBox.currentIndex = widget.ui.trainPatchComboBox.findText("48 px at 1.05 mm (faster on CPU)")
                self.assertTrue(widget.ui.startTrainingButton.enabled, "Start training stays disabled with a dataset folder")
                widget.ui.startTrainingButton.click()
                self.assertTrue(widget.ui.cancelTrainingButton.enabled, "Cancel is not enabled while training")
                self.assertFalse(widget.ui.startTrainingButton.enabled)
                self._waitFor(lambda: widget.controller.state().training.progress > 0.0, 120, "the worker's first progress")
                widget.ui.cancelTrainingButton.click()
                self._waitFor(lambda: not widget.controller.state().polling, 60, "the worker to exit")
                self.assertEqual(widget.controller.state().training.phase, controller.CANCELLED)
                self.assertEqual(glob.glob(os.path.join(tmp, "models", "*.pt")), [], "a cancelled run installed a model")
                self.assertTrue(widget.ui.startTrainingButton.enabled)
            finally:
                widget.controller.cancel_training(wait=True)
                if previous is None:
                    os.environ.pop("LYMPHNODECLASSIFIER_MODELS", None)
                else:
                    os.environ["LYMPHNODECLASSIFIER_MODELS"] = previous
                widget.controller.models_changed()
        self.delayDisplay("Test passed")

    def test_CurationRelabelsASuspect(self):
        """Open a dataset, Find suspect labels, click the top suspect, relabel it: the journal names that node."""
        self._requireDependencies()
        import json
        import tempfile

        from LymphNodeClassifierLib.curation import read_journal
        from LymphNodeClassifierLib.phantoms import generate_cohort

        self.delayDisplay("Finding suspect labels and relabelling the top one")
        widget = self._widget()
        with tempfile.TemporaryDirectory(prefix="lymphnode-selftest-") as tmp:
            folder = os.path.join(tmp, "cohort")
            generate_cohort(folder, cases=8, seed=3, label_noise=0.2)
            widget.ui.datasetFolderPathLineEdit.currentPath = folder
            widget.ui.openDatasetButton.click()
            self.assertTrue(widget.ui.findSuspectsButton.enabled, "Find suspect labels stays disabled on an open dataset")
            widget.ui.findSuspectsButton.click()
            self._waitFor(lambda: not widget.controller.state().polling, 300, "the suspect search")
            self.assertIsNotNone(widget.ui.suspectsTableView.mrmlTableNode(), "no suspects list after the search")
            widget.ui.suspectsTableView.selectRow(0)
            key = widget.controller.state().selected
            self.assertIsNotNone(key, "a suspect click selected no node")
            self.assertEqual(widget.controller.state().loaded_case, key[0])
            with open(os.path.join(folder, "dataset.json"), encoding="utf-8") as manifest:
                label = next(n["metastatic"] for n in json.load(manifest)["nodes"] if (n["case_id"], n["label_value"]) == tuple(key))
            (widget.ui.markBenignButton if label == 1 else widget.ui.markMetastaticButton).click()
            entries = read_journal(folder)[0]
            self.assertEqual(entries[-1]["target"], {"case_id": key[0], "label_value": key[1]})
            self.assertEqual((entries[-1]["field"], entries[-1]["new"]), ("metastatic", 1 - label))
            widget.controller.scene_closed()  # release the dataset before its folder goes
        self.delayDisplay("Test passed")

    def test_SampleCaseScenarios(self):
        """Load the bundled sample case, classify it, check segments, table rows and a re-run."""
        self._requireDependencies()
        self.delayDisplay("Running the sample case scenarios")
        from LymphNodeClassifierLogic import scenarios

        scenarios.run_all()
        self.delayDisplay("Test passed")

    def test_TrainingProcessScenario(self):
        """Train a tiny model in a background process: live curves, results table, model installed, make active."""
        self._requireDependencies()
        self.delayDisplay("Running a tiny training in a background process")
        from LymphNodeClassifierLogic import training_process

        result = training_process.scenario_training_process()
        self.delayDisplay(f"Test passed: {result['model']} after {result['epochs_run']} epochs")
