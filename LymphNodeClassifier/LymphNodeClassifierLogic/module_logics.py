"""Slicer's Segmentations and Volumes module logics, made once, never one per call.

Inside the Slicer application the modules' own logics serve `slicer.mrmlScene`
(`slicer.modules.segmentations.logic()`, `slicer.modules.volumes.logic()`); they are wired to the
application logic, so the Volumes logic finds the Colors logic and gives a loaded label map a colour
table. A new `vtkSlicerSegmentationsModuleLogic()` + `SetMRMLScene` per call instead re-registers the
segment editor node class with the scene and appends its four converter rules again to the
process-wide `vtkSegmentationConverterFactory` (every Classify added four), and a bare
`vtkSlicerVolumesLogic()` has no Colors logic to ask, so a label map got no colour table.

Headless (slicer-core has no `slicer.app` / `slicer.modules`), or for a scene that is not the
application's, this module does what trame-slicer's `SlicerApp` does: one `vtkSlicerApplicationLogic`
per scene with its Colors logic (the default colour nodes added) and a Volumes logic given the scene
and the application logic and registered with it under the module's name. Module logics hold their
scene, so only the few most recently used scenes keep theirs (a scene used again later gets new
ones). The Segmentations calls used here (import / export of label maps) are static in Slicer's
API and take the nodes' own scene; the one headless Segmentations logic is made once per process,
on a private scene, so its converter rules are registered once, as the module does at start-up.
"""

from __future__ import annotations

from collections import OrderedDict

import slicer

SCENES_KEPT = 4  # headless scenes whose application / Volumes logics are kept (each logic holds its scene)

_scene_logics: "OrderedDict[str, _SceneLogics]" = OrderedDict()
_headless_segmentations_logic = None


class _SceneLogics:
    """The application logic, its Colors logic and a Volumes logic of one headless scene."""

    def __init__(self, scene) -> None:
        self.scene = scene
        self.application = slicer.vtkSlicerApplicationLogic()
        self.application.SetMRMLScene(scene)
        self.colors = self.application.GetColorLogic()
        self.colors.SetMRMLScene(scene)
        if scene.GetNodeByID(self.colors.GetDefaultLabelMapColorNodeID()) is None:
            self.colors.AddDefaultColorNodes()
        self.application.SetModuleLogic("Colors", self.colors)  # the name the Volumes logic asks for
        self.volumes = slicer.vtkSlicerVolumesLogic()
        self.volumes.SetMRMLScene(scene)
        self.volumes.SetMRMLApplicationLogic(self.application)
        self.application.SetModuleLogic("Volumes", self.volumes)

    def release(self) -> None:
        for logic in (self.volumes, self.colors, self.application):
            logic.SetMRMLScene(None)


def _application_module_logic(module_name: str, scene):
    """The Slicer application's own module logic when `scene` is the application's scene, else None."""
    modules = getattr(slicer, "modules", None)
    application_scene = getattr(slicer, "mrmlScene", None)
    if modules is None or application_scene is None or (scene is not None and scene is not application_scene):
        return None
    module = getattr(modules, module_name, None)
    return None if module is None else module.logic()


def _logics_of(scene) -> _SceneLogics:
    key = scene.GetAddressAsString("vtkMRMLScene")  # a cached scene stays alive, so its address stays its own
    logics = _scene_logics.get(key)
    if logics is None:
        logics = _SceneLogics(scene)
        _scene_logics[key] = logics
        while len(_scene_logics) > SCENES_KEPT:
            _, oldest = _scene_logics.popitem(last=False)
            oldest.release()
    _scene_logics.move_to_end(key)
    return logics


def volumes_logic(scene):
    """The Volumes module logic serving `scene` (the application's inside Slicer)."""
    return _application_module_logic("volumes", scene) or _logics_of(scene).volumes


def segmentations_logic(scene=None):
    """The Segmentations module logic (the application's inside Slicer, else one per process);
    `scene`: the scene of the nodes it will be given (inside Slicer, another scene than the
    application's also gets the headless one)."""
    global _headless_segmentations_logic
    logic = _application_module_logic("segmentations", scene)
    if logic is not None:
        return logic
    if _headless_segmentations_logic is None:
        logic = slicer.vtkSlicerSegmentationsModuleLogic()
        # a scene of its own: registers the converter rules once per process and holds no user's scene
        logic.SetMRMLScene(slicer.vtkMRMLScene())
        _headless_segmentations_logic = logic
    return _headless_segmentations_logic
