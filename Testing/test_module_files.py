"""Static checks of the Slicer module's files: .ui vs module code, CMake packaging, extension metadata,
icons, import boundaries between Lib / Logic / Qt, and the pinned requirements.

Slicer's GUI can't run here, so these tests read the files (XML, `ast`, CMake text) instead of
importing the module file; they stay meaningful while other packages are still being written.
"""

from __future__ import annotations

import ast
import fnmatch
import os
import re
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_NAME = "LymphNodeClassifier"
MODULE_DIR = ROOT / MODULE_NAME
MODULE_PY = MODULE_DIR / f"{MODULE_NAME}.py"
UI_PATH = MODULE_DIR / "Resources" / "UI" / f"{MODULE_NAME}.ui"
LIB_DIR = MODULE_DIR / f"{MODULE_NAME}Lib"
LOGIC_DIR = MODULE_DIR / f"{MODULE_NAME}Logic"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
EXTENSION_CMAKE = ROOT / "CMakeLists.txt"
MODULE_REQUIREMENTS = MODULE_DIR / "Resources" / "requirements.txt"
CONTROLLER_PY = LOGIC_DIR / "controller.py"


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def module_ast() -> ast.Module:
    return ast.parse(MODULE_PY.read_text(encoding="utf-8"), filename=str(MODULE_PY))


def module_class(name: str) -> ast.ClassDef:
    for node in module_ast().body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"{MODULE_PY.name} has no class {name}")


def module_constant(name: str):
    """A literal constant of the panel: the module file imports them from the controller."""
    tree = ast.parse(CONTROLLER_PY.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{CONTROLLER_PY.name} has no module-level constant {name}")


def parameter_node_fields() -> dict[str, ast.AnnAssign]:
    """Fields of the @parameterNodeWrapper class: name -> annotated assignment."""
    for node in module_ast().body:
        if isinstance(node, ast.ClassDef) and any(_decorator_name(d) == "parameterNodeWrapper" for d in node.decorator_list):
            return {item.target.id: item for item in node.body if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)}
    raise AssertionError(f"{MODULE_PY.name} has no @parameterNodeWrapper class")


def _decorator_name(decorator: ast.expr) -> str:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")


def _names_in(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} | {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}


def field_type(annotation: ast.expr) -> tuple[str, set[str]]:
    """(kind, validators) of a field annotation; kind is 'node', 'float', 'int', 'str', 'bool', 'Path', ..."""
    validators: set[str] = set()
    if isinstance(annotation, ast.Subscript) and _names_in(annotation.value) & {"Annotated"}:
        elements = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
        annotation = elements[0]
        for extra in elements[1:]:
            validators |= {_decorator_name(extra)}
    names = _names_in(annotation)
    node_names = {n for n in names if n.startswith("vtkMRML")}
    if node_names and names <= node_names | {"Optional", "Union", "None", "slicer", "typing"}:
        return "node", validators
    if isinstance(annotation, ast.Name):
        return annotation.id, validators
    if isinstance(annotation, ast.Attribute):
        return annotation.attr, validators
    return ast.unparse(annotation), validators


@lru_cache(maxsize=None)
def ui_tree() -> ET.ElementTree:
    return ET.parse(UI_PATH)


def ui_widgets() -> dict[str, str]:
    """Widget name -> class, for every <widget> in the .ui."""
    return {w.get("name"): w.get("class") for w in ui_tree().getroot().iter("widget")}


def ui_parameter_bindings() -> dict[str, tuple[str, str]]:
    """SlicerParameterName -> (widget name, widget class)."""
    bindings = {}
    for widget in ui_tree().getroot().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                value = prop.findtext("string")
                assert value not in bindings, f"parameter {value} is bound to two widgets"
                bindings[value] = (widget.get("name"), widget.get("class"))
    return bindings


def imports_of(path: Path, module_level_only: bool = False) -> set[str]:
    """Top-level package names imported by a Python file (relative imports excluded)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    if module_level_only:  # also look inside module-level if/try blocks, not into functions
        stack, nodes = list(tree.body), []
        while stack:
            node = stack.pop()
            nodes.append(node)
            if isinstance(node, (ast.If, ast.Try, ast.With)):
                for field in ("body", "orelse", "finalbody", "handlers"):
                    stack.extend(getattr(node, field, []) or [])
            elif isinstance(node, ast.ExceptHandler):
                stack.extend(node.body)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def python_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*.py") if "__pycache__" not in p.parts)


# ---------------------------------------------------------------------------------------------
# (a) the .ui file and the module file agree
# ---------------------------------------------------------------------------------------------


def test_ui_is_a_qt_designer_file_with_a_qmrmlwidget_root():
    root = ui_tree().getroot()
    assert root.tag == "ui" and root.get("version") == "4.0"
    top = root.find("widget")
    assert top is not None and top.get("class") == "qMRMLWidget" and top.get("name") == MODULE_NAME
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "widget names in the .ui must be unique"


def test_every_non_qt_widget_class_is_declared_as_custom_widget():
    root = ui_tree().getroot()
    declared = {c.findtext("class"): c for c in root.iter("customwidget")}
    for name, cls in declared.items():
        assert declared[name].findtext("extends") and declared[name].findtext("header") == f"{name}.h"
    used = {w.get("class") for w in root.iter("widget")}
    undeclared = {cls for cls in used if not cls.startswith("Q") and cls not in declared}
    assert not undeclared, f"declare these in <customwidgets>: {sorted(undeclared)}"


# Classes Slicer's form loader can build from a .ui: Qt's own widgets, and those that a Designer plugin
# registers (any other class silently becomes a plain QWidget, as qMRMLPlotView did: issue 9 item 1).
# Read from the sources, each list with the file it came from:
# Slicer/Slicer 583e9b37 Libs/MRML/Widgets/DesignerPlugins/qMRMLWidgetsPlugin.h (qMRMLWidgetsPlugin::customWidgets)
MRML_DESIGNER_PLUGINS = {
    "qMRMLCheckableNodeComboBox", "qMRMLClipNodeDisplayWidget", "qMRMLClipNodeWidget", "qMRMLCollapsibleButton",
    "qMRMLColorTableComboBox", "qMRMLCoordinatesWidget", "qMRMLDisplayNodeViewComboBox", "qMRMLDisplayNodeWidget",
    "qMRMLEventBrokerWidget", "qMRMLExpandingWebView", "qMRMLLabelComboBox", "qMRMLLayoutWidget",
    "qMRMLLinearTransformSlider", "qMRMLListWidget", "qMRMLMatrixWidget", "qMRMLModelInfoWidget", "qMRMLNavigationView",
    "qMRMLNodeAttributeTableView", "qMRMLNodeAttributeTableWidget", "qMRMLNodeComboBox", "qMRMLPlotWidget",
    "qMRMLPlotViewControllerWidget", "qMRMLRangeWidget", "qMRMLROIWidget", "qMRMLScalarInvariantComboBox",
    "qMRMLScalarsDisplayWidget", "qMRMLSceneFactoryWidget", "qMRMLSliceControllerWidget", "qMRMLSliceInformationWidget",
    "qMRMLSliceVerticalControllerWidget", "qMRMLSliceWidget", "qMRMLSliderWidget", "qMRMLSpinBox", "qMRMLTableView",
    "qMRMLThreeDViewInformationWidget", "qMRMLThreeDView", "qMRMLTransformSliders", "qMRMLTreeView",
    "qMRMLVolumeInfoWidget", "qMRMLVolumeThresholdWidget", "qMRMLWidget", "qMRMLWindowLevelWidget",
}
# commontk/CTK 868d56c7 Libs/Widgets/Plugins/ctkWidgetsPlugins.h (ctkWidgetsPlugins::customWidgets)
CTK_DESIGNER_PLUGINS = {
    "ctkActionsWidget", "ctkAxesWidget", "ctkCheckableComboBox", "ctkCheckablePushButton", "ctkCheckBox",
    "ctkCollapsibleButton", "ctkCollapsibleGroupBox", "ctkColorPickerButton", "ctkComboBox", "ctkCoordinatesWidget",
    "ctkCrosshairLabel", "ctkDirectoryButton", "ctkDoubleRangeSlider", "ctkDoubleSlider", "ctkDoubleSpinBox",
    "ctkDynamicSpacer", "ctkExpandButton", "ctkExpandableWidget", "ctkFittedTextBrowser", "ctkFontButton",
    "ctkLanguageComboBox", "ctkMaterialPropertyPreviewLabel", "ctkMaterialPropertyWidget", "ctkMatrixWidget",
    "ctkMenuButton", "ctkModalityWidget", "ctkPathLineEdit", "ctkPathListButtonsWidget", "ctkPathListWidget",
    "ctkPopupWidget", "ctkPushButton", "ctkRangeSlider", "ctkRangeWidget", "ctkSearchBox", "ctkSettingsPanel",
    "ctkSettingsDialog", "ctkSliderWidget", "ctkSplitter", "ctkThumbnailLabel", "ctkTransferFunctionView",
    "ctkTreeComboBox", "ctkWorkflowButtonBoxWidget", "ctkWorkflowWidgetStep",
}
# Qt Designer's own widget box (QUiLoader creates these without a plugin); layouts are <layout>, not <widget>.
QT_WIDGETS = {
    "QWidget", "QLabel", "QPushButton", "QToolButton", "QCheckBox", "QRadioButton", "QComboBox", "QSpinBox",
    "QDoubleSpinBox", "QLineEdit", "QTextEdit", "QPlainTextEdit", "QProgressBar", "QSlider", "QGroupBox", "QFrame",
    "QTabWidget", "QStackedWidget", "QScrollArea", "QTableView", "QTableWidget", "QTreeView", "QTreeWidget",
    "QListView", "QListWidget", "QSplitter", "QDialogButtonBox",
}


def test_every_ui_class_is_one_that_slicers_designer_plugins_register():
    unknown = {name: cls for name, cls in ui_widgets().items()
               if cls not in MRML_DESIGNER_PLUGINS | CTK_DESIGNER_PLUGINS | QT_WIDGETS}
    assert not unknown, f"no Designer plugin registers these classes (they would load as plain QWidgets): {unknown}"
    assert "qMRMLPlotView" not in MRML_DESIGNER_PLUGINS  # the view has no plugin; qMRMLPlotWidget.plotView() is it


def test_every_object_name_the_module_looks_up_exists_in_the_ui():
    """Names reached as self.ui.<name> or widget.ui.<name> (the self-test) and findChild/getChild lookups."""
    names = set()
    for node in ast.walk(module_ast()):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui":
            names.add(node.attr)
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(("findChild", "findChildren")) and node.args:
            last = node.args[-1]
            if isinstance(last, ast.Constant) and isinstance(last.value, str):
                names.add(last.value)
    assert {"classifyButton", "startTrainingButton", "cancelTrainingButton", "trainingPlotWidget", "intendedUseLabel"} <= names
    missing = names - set(ui_widgets())
    assert not missing, f"looked up in {MODULE_PY.name} but not in the .ui: {sorted(missing)}"


def test_window_control_says_it_changes_the_display_only():
    tooltip = next(w for w in ui_tree().getroot().iter("widget") if w.get("name") == "windowPresetComboBox")
    text = next(p.findtext("string") for p in tooltip.findall("property") if p.get("name") == "toolTip")
    assert "DISPLAYED" in text and "card" in text and "before classification" not in text
    help_text = ast.unparse(module_class(MODULE_NAME))
    assert "<b>displayed</b>" in help_text and "trained with" in help_text


def test_every_mrml_widget_receives_the_scene():
    root = ui_tree().getroot()
    receivers = {
        c.findtext("receiver") for c in root.iter("connection")
        if c.findtext("sender") == MODULE_NAME and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    mrml_widgets = {name for name, cls in ui_widgets().items() if cls.startswith("qMRML") and name != MODULE_NAME}
    assert mrml_widgets, "the .ui should contain MRML widgets"
    assert mrml_widgets <= receivers, f"connect mrmlSceneChanged -> setMRMLScene for {sorted(mrml_widgets - receivers)}"


def test_every_self_ui_widget_used_by_the_module_exists_in_the_ui():
    used = {
        node.attr for node in ast.walk(module_ast())
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
        and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"
    }
    assert used, "the Widget should use widgets of the .ui through self.ui"
    missing = used - set(ui_widgets())
    assert not missing, f"self.ui.<name> used in {MODULE_PY.name} but not in the .ui: {sorted(missing)}"


def test_every_slicer_parameter_name_is_a_parameter_node_field():
    fields = parameter_node_fields()
    bindings = ui_parameter_bindings()
    assert bindings, "the .ui should bind widgets to the parameter node"
    unknown = set(bindings) - set(fields)
    assert not unknown, f"SlicerParameterName values that are not fields of the parameter node: {sorted(unknown)}"


# Which widget classes slicer.parameterNodeWrapper can bind to which field types (its GuiConnector
# classes compare the exact widget class): connectGui raises at run time for any other pair.
_CONNECTABLE = {
    "qMRMLNodeComboBox": {"node"},
    "QComboBox": {"str", "int", "float", "bool"},
    "ctkComboBox": {"str", "int", "float", "bool"},
    "QDoubleSpinBox": {"float", "int"},
    "ctkDoubleSpinBox": {"float", "int"},
    "ctkSliderWidget": {"float", "int"},
    "qMRMLSliderWidget": {"float", "int"},
    "ctkDoubleSlider": {"float", "int"},
    "qMRMLSpinBox": {"float", "int"},
    "QSpinBox": {"int"},
    "QSlider": {"int"},
    "QCheckBox": {"bool"},
    "QPushButton": {"bool"},
    "ctkCheckablePushButton": {"bool"},
    "QLineEdit": {"str"},
    "QLabel": {"str"},
    "QTextEdit": {"str"},
    "ctkPathLineEdit": {"Path", "PurePath", "PosixPath", "WindowsPath"},
    "ctkDirectoryButton": {"Path", "PurePath", "PosixPath", "WindowsPath"},
}


def test_bound_widgets_can_represent_their_field_types():
    fields = parameter_node_fields()
    for parameter, (widget, cls) in ui_parameter_bindings().items():
        kind, validators = field_type(fields[parameter].annotation)
        assert cls in _CONNECTABLE, f"{widget} ({cls}) can't be bound to a parameter node field"
        assert kind in _CONNECTABLE[cls], f"{widget} ({cls}) can't represent field {parameter} of type {kind}"
        if cls in ("QComboBox", "ctkComboBox"):
            assert "Choice" in validators, f"{parameter} is shown in a combo box, so it needs a Choice annotation"
        if cls in ("ctkSliderWidget", "qMRMLSliderWidget", "QSlider"):
            assert validators & {"WithinRange"} or validators >= {"Minimum", "Maximum"}, f"{parameter} needs bounds for a slider"


def test_label_input_accepts_label_maps_and_segmentations():
    annotation = parameter_node_fields()["inputLabels"].annotation
    names = _names_in(annotation)
    # Without None the wrapper can't store "nothing selected"; with a bare vtkMRMLNode the combo
    # box would list every node of the scene (the wrapper sets nodeTypes from the annotation).
    assert {"vtkMRMLLabelMapVolumeNode", "vtkMRMLSegmentationNode"} <= names
    assert "None" in names or "Optional" in names
    assert "vtkMRMLNode" not in names


def test_parameter_node_has_the_documented_fields_and_defaults():
    fields = parameter_node_fields()
    expected = {"inputCT", "inputLabels", "windowPreset", "windowLow", "windowHigh", "modelPath", "device",
                "gradcamOpacity", "outputSegmentation", "outputTable", "outputGradCam"}
    assert expected <= set(fields)
    defaults = {name: ast.literal_eval(f.value) for name, f in fields.items() if f.value is not None}
    assert defaults["windowPreset"] == "abdomen"
    assert (defaults["windowLow"], defaults["windowHigh"]) == (-135.0, 215.0)
    assert defaults["modelPath"] == "" and defaults["device"] == "auto" and defaults["gradcamOpacity"] == 0.4
    assert module_constant("DEVICE_NAMES") == ["auto", "cpu", "cuda"]


def test_window_presets_match_the_lib():
    if not (LIB_DIR / "windowing.py").exists():
        pytest.skip("LymphNodeClassifierLib/windowing.py is not written yet")
    from LymphNodeClassifierLib import windowing

    names = module_constant("WINDOW_PRESET_NAMES")
    assert module_constant("CUSTOM_WINDOW") == windowing.CUSTOM_WINDOW
    assert set(names) == set(windowing.WINDOW_PRESETS) | {windowing.CUSTOM_WINDOW}
    default = ast.literal_eval(parameter_node_fields()["windowPreset"].value)
    assert default == windowing.DEFAULT_WINDOW_PRESET
    low = ast.literal_eval(parameter_node_fields()["windowLow"].value)
    high = ast.literal_eval(parameter_node_fields()["windowHigh"].value)
    assert (low, high) == tuple(windowing.WINDOW_PRESETS[default])


def test_module_file_imports_heavy_packages_lazily():
    # Slicer imports the module file at startup, before PyTorch may be installed: only Slicer's own
    # packages may be imported at module level; the Lib/Logic packages are imported in methods.
    allowed = {"__future__", "hashlib", "logging", "os", "sys", "traceback", "typing", "json", "pathlib", "vtk", "qt", "ctk", "slicer",
               "LymphNodeClassifierLogic"}
    imported = imports_of(MODULE_PY, module_level_only=True)
    assert imported <= allowed, f"import these lazily, inside methods: {sorted(imported - allowed)}"
    # ... and the one Logic module it imports at load time (the controller's option lists) imports only
    # the standard library at module level, as does the package's __init__
    logic_modules = {n.module for n in module_ast().body if isinstance(n, ast.ImportFrom) and n.module}
    logic_modules |= {a.name for n in module_ast().body if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in logic_modules if m.startswith("LymphNodeClassifierLogic")} <= {"LymphNodeClassifierLogic.controller"}
    for path in (CONTROLLER_PY, LOGIC_DIR / "__init__.py"):
        heavy = imports_of(path, module_level_only=True) - {"__future__", "os", "contextlib", "dataclasses", "typing"}
        assert not heavy, f"{path.name} imports {sorted(heavy)} at module level"


def test_module_file_has_the_template_classes():
    bases = {
        f"{MODULE_NAME}": "ScriptedLoadableModule",
        f"{MODULE_NAME}Widget": "ScriptedLoadableModuleWidget",
        f"{MODULE_NAME}Logic": "ScriptedLoadableModuleLogic",
        f"{MODULE_NAME}Test": "ScriptedLoadableModuleTest",
    }
    for name, base in bases.items():
        assert base in {ast.unparse(b) for b in module_class(name).bases}, f"{name} must derive from {base}"
    assert "VTKObservationMixin" in {ast.unparse(b) for b in module_class(f"{MODULE_NAME}Widget").bases}


def _called_attributes(node: ast.AST) -> set[str]:
    return {ast.unparse(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)}


def test_self_test_runs_the_logic_scenarios():
    test_class = module_class(f"{MODULE_NAME}Test")
    assert any(isinstance(n, ast.FunctionDef) and n.name == "runTest" for n in test_class.body)
    assert "scenarios.run_all" in _called_attributes(test_class)
    # ... and presses the panel's real buttons (issue 9 item 10)
    clicked = {c for c in _called_attributes(test_class) if c.endswith(".click")}
    for button in ("loadSampleCaseButton", "classifyButton", "startTrainingButton", "cancelTrainingButton",
                   "openDatasetButton", "findSuspectsButton"):
        assert f"widget.ui.{button}.click" in clicked, f"the self-test never clicks {button}"
    assert "widgetRepresentation().self" in ast.unparse(test_class)
    scenarios = LOGIC_DIR / "scenarios.py"
    if not scenarios.exists():
        pytest.skip("LymphNodeClassifierLogic/scenarios.py (run_all) is not written yet")
    tree = ast.parse(scenarios.read_text(encoding="utf-8"))
    run_all = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run_all"]
    assert run_all, "LymphNodeClassifierLogic/scenarios.py must define run_all()"
    arguments = run_all[0].args
    required = len(arguments.posonlyargs) + len(arguments.args) - len(arguments.defaults)
    required += sum(default is None for default in arguments.kw_defaults)
    assert required == 0, "run_all() is called without arguments by the Slicer self-test"


def test_module_logic_matches_the_logic_package_api():
    # The thin Logic class calls ClassificationLogic.classify(ct, labels, **these keywords) and
    # ClassificationLogic.extract_node_table(ct, labels).
    if not (LOGIC_DIR / "__init__.py").exists():
        pytest.skip("LymphNodeClassifierLogic is not written yet")
    import inspect

    try:
        from LymphNodeClassifierLogic import ClassificationLogic
    except ImportError as error:
        pytest.skip(f"LymphNodeClassifierLogic can't be imported yet: {error}")
    wrapper = module_class(f"{MODULE_NAME}Logic")
    calls = {}
    for node in ast.walk(wrapper):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and ast.unparse(node.func.value) == "self.classification":
            calls[node.func.attr] = node
    assert set(calls) == {"classify", "extract_node_table"}
    for method, call in calls.items():
        assert hasattr(ClassificationLogic, method), f"ClassificationLogic.{method} is missing"
        signature = inspect.signature(getattr(ClassificationLogic, method))
        try:
            signature.bind(None, *[None] * len(call.args), **{k.arg: None for k in call.keywords})
        except TypeError as error:
            pytest.fail(f"ClassificationLogic.{method}{signature} doesn't accept the module's call: {error}")


# ---------------------------------------------------------------------------------------------
# (b) every script and resource of the module folder is packaged by its CMakeLists.txt
# ---------------------------------------------------------------------------------------------

_IGNORED_PARTS = {"__pycache__", "Testing"}


def module_files() -> tuple[set[str], set[str]]:
    """(python scripts, other files) of the module folder, relative, as CMake would list them."""
    scripts, resources = set(), set()
    for path in MODULE_DIR.rglob("*"):
        relative = path.relative_to(MODULE_DIR)
        if not path.is_file() or _IGNORED_PARTS & set(relative.parts) or path.name == "CMakeLists.txt":
            continue
        if path.suffix == ".pyc" or any(part.endswith(".egg-info") or part.startswith(".") for part in relative.parts):
            continue
        (scripts if path.suffix == ".py" else resources).add(relative.as_posix())
    return scripts, resources


def _cmake_commands(text: str, command: str) -> list[list[str]]:
    text = re.sub(r"#[^\n]*", "", text)
    return [body.split() for body in re.findall(rf"\b{command}\s*\(([^)]*)\)", text, flags=re.IGNORECASE)]


def cmake_listed_files() -> tuple[set[str], set[str]]:
    """Emulate the module CMakeLists.txt: expand file(GLOB...) variables and the set(...) lists."""
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    variables = {"MODULE_NAME": MODULE_NAME, "CMAKE_CURRENT_SOURCE_DIR": str(MODULE_DIR)}

    def expand(token: str) -> list[str]:
        token = re.sub(r"\$\{(\w+)\}", lambda m: variables.get(m.group(1), m.group(0)), token)
        return token.split(";") if token else []

    for args in _cmake_commands(text, "file"):
        mode, variable, rest = args[0].upper(), args[1], args[2:]
        if mode not in ("GLOB", "GLOB_RECURSE"):
            continue
        patterns, skip = [], 0
        for index, arg in enumerate(rest):
            if skip:
                skip -= 1
            elif arg in ("LIST_DIRECTORIES", "RELATIVE"):
                skip = 1
            elif arg not in ("CONFIGURE_DEPENDS", "FOLLOW_SYMLINKS"):
                patterns.extend(expand(arg))
        matches = []
        for pattern in patterns:
            directory, name = os.path.split(pattern)
            base = MODULE_DIR / directory
            candidates = base.rglob("*") if mode == "GLOB_RECURSE" else base.glob("*")
            matches += sorted(p.relative_to(MODULE_DIR).as_posix() for p in candidates if p.is_file() and fnmatch.fnmatch(p.name, name))
        variables[variable] = ";".join(matches)
    lists = {}
    for args in _cmake_commands(text, "set"):
        lists[args[0]] = [item for arg in args[1:] for item in expand(arg)]
        variables[args[0]] = ";".join(lists[args[0]])
    return set(lists.get("MODULE_PYTHON_SCRIPTS", [])), set(lists.get("MODULE_PYTHON_RESOURCES", []))


def test_module_cmakelists_packages_every_script_and_resource():
    scripts, resources = module_files()
    listed_scripts, listed_resources = cmake_listed_files()
    assert f"{MODULE_NAME}.py" in listed_scripts
    assert not scripts - listed_scripts, f"Python files missing from SCRIPTS: {sorted(scripts - listed_scripts)}"
    assert not resources - listed_resources, f"files missing from RESOURCES: {sorted(resources - listed_resources)}"
    unknown = (listed_scripts - scripts) | (listed_resources - resources)
    assert not unknown, f"CMakeLists.txt lists files that don't exist: {sorted(unknown)}"
    assert all(s.endswith(".py") for s in listed_scripts) and not any(r.endswith(".py") for r in listed_resources)


def test_module_cmakelists_calls_the_slicer_macros():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}\s*SCRIPTS \$\{MODULE_PYTHON_SCRIPTS\}"
                     r"\s*RESOURCES \$\{MODULE_PYTHON_RESOURCES\}\s*WITH_GENERIC_TESTS\s*\)", text)
    assert f"set(MODULE_NAME {MODULE_NAME})" in text
    testing = (MODULE_DIR / "Testing" / "Python" / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "if(BUILD_TESTING)" in testing and "slicer_add_python_unittest(" in testing
    assert "add_subdirectory(Python)" in (MODULE_DIR / "Testing" / "CMakeLists.txt").read_text(encoding="utf-8")


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_itself_lists_the_same_files(tmp_path):
    # Configure the module folder with stand-ins for Slicer's macros; they print what they get.
    (tmp_path / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.16)\nproject(stub NONE)\n"
        "macro(slicerMacroBuildScriptedModule)\n"
        "  cmake_parse_arguments(M \"WITH_GENERIC_TESTS\" \"NAME\" \"SCRIPTS;RESOURCES\" ${ARGN})\n"
        "  foreach(f ${M_SCRIPTS})\n    message(STATUS \"SCRIPT=${f}\")\n  endforeach()\n"
        "  foreach(f ${M_RESOURCES})\n    message(STATUS \"RESOURCE=${f}\")\n  endforeach()\n"
        "endmacro()\n"
        "macro(slicer_add_python_unittest)\n  message(STATUS \"UNITTEST=${ARGN}\")\nendmacro()\n"
        "set(BUILD_TESTING ON)\n"
        f"add_subdirectory(\"{MODULE_DIR.as_posix()}\" module)\n",
        encoding="utf-8",
    )
    run = subprocess.run(["cmake", "-S", str(tmp_path), "-B", str(tmp_path / "build")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    found = re.findall(r"-- (SCRIPT|RESOURCE|UNITTEST)=(.*)", run.stdout)
    scripts = {value for kind, value in found if kind == "SCRIPT"}
    resources = {value for kind, value in found if kind == "RESOURCE"}
    assert (scripts, resources) == cmake_listed_files()
    unittest = [value for kind, value in found if kind == "UNITTEST"]
    assert unittest and Path(unittest[0].split(";")[-1]).resolve() == MODULE_PY.resolve()


# ---------------------------------------------------------------------------------------------
# (c) extension metadata and icons
# ---------------------------------------------------------------------------------------------


def extension_settings() -> dict[str, str]:
    text = EXTENSION_CMAKE.read_text(encoding="utf-8")
    return dict(re.findall(r'^set\((EXTENSION_\w+)\s+"([^"]*)"\)', text, flags=re.MULTILINE))


def test_extension_cmakelists_has_the_required_metadata():
    text = EXTENSION_CMAKE.read_text(encoding="utf-8")
    settings = extension_settings()
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert settings.get(f"EXTENSION_{key}", "").strip(), f"EXTENSION_{key} is not set"
    assert settings["EXTENSION_CATEGORY"] == "Quantification"
    assert "PyTorch" in settings["EXTENSION_DEPENDS"].split(";")
    homepage = re.match(r"https://github\.com/([\w.-]+)/([\w.-]+)", settings["EXTENSION_HOMEPAGE"])
    assert homepage, "EXTENSION_HOMEPAGE should be the GitHub repository"
    raw = f"https://raw.githubusercontent.com/{homepage.group(1)}/{homepage.group(2)}/"
    assert settings["EXTENSION_ICONURL"] == raw + "main/LymphNodeClassifier.png"
    assert all(url.startswith("https://") for url in settings["EXTENSION_SCREENSHOTURLS"].split())
    for url in settings["EXTENSION_SCREENSHOTURLS"].split() + [settings["EXTENSION_ICONURL"]]:
        if url.startswith(raw + "main/"):  # a file of this repository: it must be there
            assert (EXTENSION_CMAKE.parent / url[len(raw + "main/"):]).is_file(), f"{url} points at a file the repository lacks"
    assert re.search(rf"^project\({MODULE_NAME}\)", text, flags=re.MULTILINE)
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", f"add_subdirectory({MODULE_NAME})",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text, f"missing from the extension CMakeLists.txt: {line}"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_icons_are_identical_128_pixel_pngs():
    extension_icon = ROOT / f"{MODULE_NAME}.png"
    module_icon = MODULE_DIR / "Resources" / "Icons" / f"{MODULE_NAME}.png"
    assert png_size(extension_icon) == (128, 128)
    assert extension_icon.read_bytes() == module_icon.read_bytes()


# ---------------------------------------------------------------------------------------------
# (d) import boundaries
# ---------------------------------------------------------------------------------------------

_GUI_PACKAGES = {"qt", "ctk", "PythonQt", "PyQt5", "PyQt6", "PySide2", "PySide6"}


def test_lib_never_imports_qt_ctk_slicer_or_vtk():
    files = python_files(LIB_DIR)
    assert files, "LymphNodeClassifierLib has no Python files"
    forbidden = _GUI_PACKAGES | {"slicer", "vtk", "vtkmodules", "mrml"}
    offenders = {p.relative_to(ROOT).as_posix(): sorted(imports_of(p) & forbidden) for p in files}
    assert not {k: v for k, v in offenders.items() if v}, offenders


def test_logic_never_imports_qt_or_ctk():
    offenders = {p.relative_to(ROOT).as_posix(): sorted(imports_of(p) & _GUI_PACKAGES) for p in python_files(LOGIC_DIR)}
    assert not {k: v for k, v in offenders.items() if v}, offenders


# Packages a Slicer installation already has (PyTorch comes from the PyTorch extension).
_SHIPPED_WITH_SLICER = {"numpy", "scipy", "SimpleITK", "vtk", "vtkmodules", "slicer", "qt", "ctk", "torch", "packaging", "requests"}
_DISTRIBUTION_NAMES = {"sklearn": "scikit-learn", "PIL": "pillow", "yaml": "pyyaml", "cv2": "opencv-python", "skimage": "scikit-image"}


def _requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "-")):
            names.add(re.split(r"[\s\[<>=!~;]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_slicer_requirements_cover_module_level_imports():
    own = {f"{MODULE_NAME}Lib", f"{MODULE_NAME}Logic"}
    needed = set()
    for path in python_files(LIB_DIR) + python_files(LOGIC_DIR):
        needed |= imports_of(path, module_level_only=True)
    third_party = needed - set(sys.stdlib_module_names) - own - _SHIPPED_WITH_SLICER
    wanted = {_DISTRIBUTION_NAMES.get(name, name).lower().replace("_", "-") for name in third_party}
    listed = _requirement_names(MODULE_REQUIREMENTS)
    assert wanted <= listed, f"add to {MODULE_REQUIREMENTS.relative_to(ROOT)}: {sorted(wanted - listed)}"
    for line in MODULE_REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        assert line.startswith("#") or " " not in line.strip(), "one requirement per line, without spaces"


# ---------------------------------------------------------------------------------------------
# packaging of the headless package and developer entry points
# ---------------------------------------------------------------------------------------------


def test_test_requirements_are_pinned_and_match_pyproject():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = [
        line.strip() for line in (ROOT / "requirements-test.txt").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert requirements == project["optional-dependencies"]["test"]
    assert all(re.fullmatch(r"[\w.-]+==[\w.+-]+", r) for r in requirements), requirements
    assert "torch==2.13.0" in requirements
    assert project["scripts"]["lymphnode-classifier"] == "LymphNodeClassifierLib.cli:main"
    assert project["requires-python"] == ">=3.10"


def test_ci_script_is_executable_and_runs_make_test():
    script = ROOT / ".ci" / "run"
    text = script.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text and "make test" in text
    assert os.access(script, os.X_OK)
