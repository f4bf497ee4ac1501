"""Shared pytest setup: make `import LymphNodeClassifierLib` work from the source tree."""

import sys
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parent.parent / "LymphNodeClassifier"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))
