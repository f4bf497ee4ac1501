"""MRML logic of LymphNodeClassifier: MRML nodes in, MRML nodes out (imports slicer and vtk, never qt)."""

from .logic import DEFAULT_MODEL_PATH, ClassificationLogic, ClassificationOutputs

__all__ = ["ClassificationLogic", "ClassificationOutputs", "DEFAULT_MODEL_PATH"]
