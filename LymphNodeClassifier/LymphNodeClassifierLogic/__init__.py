"""MRML logic of LymphNodeClassifier: MRML nodes in, MRML nodes out (imports slicer and vtk, never qt)."""

__all__ = ["ClassificationLogic", "ClassificationOutputs", "DEFAULT_MODEL_PATH"]


def __getattr__(name):
    # Lazy: the module file imports LymphNodeClassifierLogic.controller's option lists at load time,
    # before PyTorch (which .logic needs) may be installed.
    if name in __all__:
        from . import logic

        return getattr(logic, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
