"""Image + measurement fusion: the node's measured features (`node_features`) beside the CNN.

A training option (`TrainingConfig.fusion`, `--fusion`):

- ``none``: the CNN alone (every model before this option).
- ``mean``: the CNN is trained as usual; then a logistic regression on the node's standardised
  features is fitted on the training part only (median imputation, standardisation, L2; its C by
  a 4-fold patient-grouped inner CV on the same training part, AUC, grid 1e-3..10, the protocol
  of bench/bench_radiomics.py), and the output is the mean of the two probabilities. The mean is
  what measured best out of fold on LIDC (docs/LIDC_RESULTS.md): a fitted stacker's weights cost
  more than they gain with ~500 training nodes.
- ``concat``: end to end: the CNN's pooled features and the standardised node features meet in
  the final linear layer (`model.FusedNetwork`), trained jointly; standardisation constants from
  the training part.

Both are exported in one TorchScript archive (`model.FusedNetwork`): ``forward(x)`` stays the
image branch (Grad-CAM explains it, unchanged), ``fused(x, node_features)`` gives the fused logit
from the RAW features (imputation and standardisation are buffers inside the archive, so the
weights digest covers them). The card's ``preprocessing.node_features`` names the features and
the feature code's version, so inference computes the same features with the same code
(`pipeline.classify_images`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import InputError
from .fileio import atomic_path
from .validate import InputPolicy

FUSION_MODES = ("none", "mean", "concat")
C_GRID = tuple(float(c) for c in np.logspace(-3, 1, 9))
INNER_FOLDS = 4


def check_fusion(mode) -> str:
    key = str(mode).strip().lower()
    if key not in FUSION_MODES:
        raise InputError(f"Unknown fusion '{mode}'; use one of: {', '.join(FUSION_MODES)}.")
    return key


def card_block(mode: str) -> dict:
    """The card's `preprocessing.node_features` entry of a fused model."""
    from .node_features import FEATURE_NAMES, FEATURES_VERSION

    return {"fusion": check_fusion(mode), "names": list(FEATURE_NAMES), "version": FEATURES_VERSION}


# --------------------------------------------------------------------------------------------
# the features of a PatchSet's rows (cached beside the patch arrays)


def patchset_features(
    dataset, patchset, cache_dir: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None, is_cancelled: Callable[[], bool] | None = None,
    policy: InputPolicy = InputPolicy(),
) -> np.ndarray:
    """`node_features.feature_matrix` of the PatchSet's rows (row i = node i), cached in `cache_dir`
    under the patch set's fingerprint and the feature code's version; the cases are read under
    `policy` (the command's input options), as the patches were."""
    from .node_features import FEATURE_NAMES, FEATURES_VERSION, feature_matrix

    case_ids = np.asarray(patchset.case_ids).astype(str)
    label_values = np.asarray(patchset.label_values, dtype=np.int64)
    cache = Path(cache_dir) / f"node-features-v{FEATURES_VERSION}-{patchset.fingerprint}.npz" if cache_dir and patchset.fingerprint else None
    if cache is not None and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as data:
                if (data["case_ids"].astype(str).tolist() == case_ids.tolist() and data["label_values"].tolist() == label_values.tolist()
                        and data["names"].astype(str).tolist() == list(FEATURE_NAMES)):
                    return data["features"].astype(np.float64)
        except (OSError, KeyError, ValueError):
            pass  # a damaged cache is recomputed
    features = feature_matrix(dataset, case_ids, label_values, progress=progress, is_cancelled=is_cancelled, policy=policy)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, features=features, case_ids=case_ids, label_values=label_values, names=np.array(FEATURE_NAMES))
    return features


def attach_features(dataset, patchset, config, cache_dir: str | Path | None = None, **kwargs):
    """`patchset` with `node_features` filled (`patchset_features`) when `config.fusion` (a
    TrainingConfig) or a model card (`preprocessing.node_features`) needs them."""
    needed = uses_node_features(config) if isinstance(config, dict) else check_fusion(config.fusion) != "none"
    if needed and patchset.node_features is None and len(patchset):
        patchset.node_features = patchset_features(dataset, patchset, cache_dir, **kwargs)
    return patchset


# --------------------------------------------------------------------------------------------
# standardisation and the logistic regression (scikit-learn), as constants for the archive


def _preprocessor(*then):
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # keep_empty_features: a feature never measured in the training part stays a (zero) column
    return make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True), StandardScaler(), *then)


def logistic_model(c: float):
    """Median imputation, standardisation and an L2 logistic regression of strength C (also bench/bench_radiomics.py's model)."""
    from sklearn.linear_model import LogisticRegression

    return _preprocessor(LogisticRegression(C=c, max_iter=5000))


def standardisation(features: np.ndarray) -> dict[str, np.ndarray]:
    """Median (imputation of NaN), mean and scale of each feature over these (training) rows."""
    pre = _preprocessor().fit(np.asarray(features, dtype=np.float64))
    imputer, scaler = pre.steps[0][1], pre.steps[1][1]
    return {"median": imputer.statistics_.astype(np.float64), "mean": scaler.mean_.astype(np.float64), "scale": scaler.scale_.astype(np.float64)}


def choose_c(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int = 0) -> float:
    """The C of C_GRID with the best pooled inner out-of-fold AUC on (x, y), patient-grouped."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold

    n_splits = min(INNER_FOLDS, len(set(np.asarray(groups).tolist())))
    if n_splits < 2 or min(int(y.sum()), int(y.size - y.sum())) < n_splits:
        return 1.0  # too few patients to choose: scikit-learn's default
    inner = list(StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(x, y, groups))
    best, best_auc = C_GRID[0], -1.0
    for c in C_GRID:
        p = np.zeros(y.size)
        for fit, held in inner:
            if 0 < y[fit].sum() < fit.size:
                p[held] = logistic_model(c).fit(x[fit], y[fit]).predict_proba(x[held])[:, 1]
        auc = roc_auc_score(y, p) if 0 < y.sum() < y.size else math.nan
        if auc > best_auc + 1e-9:
            best, best_auc = c, auc
    return best


def fit_feature_logistic(features: np.ndarray, y: np.ndarray, groups: Sequence, seed: int = 0) -> dict:
    """Median imputation + standardisation + L2 logistic regression on (training) rows, C by inner CV.

    Returns the constants the archive needs (`median`, `mean`, `scale`, `coef`, `intercept`) and `C`.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if x.ndim != 2 or x.shape[0] != y.size:
        raise InputError(f"{x.shape[0] if x.ndim else 0} feature rows for {y.size} labels; pass one row of node features per node.")
    if not 0 < int(y.sum()) < y.size:
        raise InputError("The feature model needs training nodes of both classes; label nodes of both classes.")
    c = choose_c(x, y, np.asarray(groups).astype(str), seed)
    fitted = logistic_model(c).fit(x, y)
    imputer, scaler, logistic = (step for _, step in fitted.steps)
    return {
        "C": c, "median": imputer.statistics_.astype(np.float64), "mean": scaler.mean_.astype(np.float64),
        "scale": scaler.scale_.astype(np.float64), "coef": logistic.coef_[0].astype(np.float64),
        "intercept": float(logistic.intercept_[0]), "pipeline": fitted,
    }


# --------------------------------------------------------------------------------------------
# inference with a fused model file


def uses_node_features(card: dict) -> bool:
    """Whether a model card asks for node features at inference (`preprocessing.node_features`)."""
    return card["preprocessing"].get("node_features") is not None


def features_of_nodes(ct, component_image, nodes) -> np.ndarray:
    """(N, F) `node_features.node_features` of `nodes` on `component_image` (the CT grid), in order."""
    from .node_features import FEATURE_NAMES, node_features

    rows = [node_features(ct, component_image, node) for node in nodes]
    return np.array([[row[name] for name in FEATURE_NAMES] for row in rows], dtype=np.float64).reshape(len(rows), len(FEATURE_NAMES))


def predict_fused(loaded_model, patches: np.ndarray, node_features: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(fused, image-branch) probabilities ``(N,)`` (float64) of a fused model file: its exported
    ``fused(patches, features)`` method, and ``forward(patches)`` for the image branch alone."""
    import torch

    from .inference import check_patches, deterministic
    from .model import interpreted_execution

    block = loaded_model.card["preprocessing"].get("node_features")
    if block is None:
        raise InputError("This model does not fuse node features; classify with inference.predict.")
    patches = check_patches(patches, loaded_model.card)
    values = np.asarray(node_features, dtype=np.float32)
    if values.shape != (patches.shape[0], len(block["names"])):
        raise InputError(f"{values.shape} node features for {patches.shape[0]} patches; the model needs {len(block['names'])} per node "
                         "(node_features.FEATURE_NAMES), computed with fusion.features_of_nodes.")
    module = loaded_model.module
    module.eval()
    fused, image = np.empty(patches.shape[0]), np.empty(patches.shape[0])
    with deterministic(), torch.inference_mode(), interpreted_execution():
        for start in range(0, patches.shape[0], batch_size):
            x = torch.from_numpy(patches[start:start + batch_size]).to(loaded_model.device)
            f = torch.from_numpy(values[start:start + batch_size]).to(loaded_model.device)
            fused[start:start + x.shape[0]] = torch.sigmoid(module.fused(x, f).double()).cpu().numpy()
            image[start:start + x.shape[0]] = torch.sigmoid(module(x).double()).cpu().numpy()
    return fused, image
