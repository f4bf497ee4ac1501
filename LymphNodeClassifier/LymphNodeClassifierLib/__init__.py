"""LymphNodeClassifierLib: the pure-Python core of the LymphNodeClassifier Slicer extension.

Works on SimpleITK images, numpy arrays and torch tensors only: no Qt, no `slicer`, so the
same code runs inside Slicer, from the command line and in tests.
"""

__version__ = "0.1.0"
