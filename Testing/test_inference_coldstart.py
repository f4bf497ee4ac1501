"""A fresh process's first classification: nothing slow is imported or compiled on the first call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from LymphNodeClassifierLib.inference import deterministic
from helpers import export_untrained_model

LIB_PARENT = Path(__file__).resolve().parents[1] / "LymphNodeClassifier"


def test_deterministic_sets_and_restores_the_flag():
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    with deterministic():
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()) == before


def test_first_predict_and_gradcam_in_a_fresh_process_do_not_import_inductor(tmp_path):
    # torch.use_deterministic_algorithms imports torch._inductor (dynamo, sympy): 1-3 s of a
    # fresh process's first Classify. predict / gradcam must not pull it in.
    path = export_untrained_model(tmp_path / "m.pt", size=16)
    script = (
        "import json, sys, numpy as np\n"
        "from LymphNodeClassifierLib.model import load_model\n"
        "from LymphNodeClassifierLib.inference import predict\n"
        "from LymphNodeClassifierLib.gradcam import gradcam\n"
        f"m = load_model({str(path)!r})\n"
        "x = np.random.default_rng(0).random((3, 3, 16, 16), dtype=np.float32)\n"
        "p = predict(m, x); c = gradcam(m, x)\n"
        "print(json.dumps({'inductor': 'torch._inductor' in sys.modules, 'dynamo': 'torch._dynamo' in sys.modules, 'n': len(p)}))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(LIB_PARENT), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"inductor": False, "dynamo": False, "n": 3}
