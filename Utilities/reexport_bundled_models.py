"""Re-export an existing model file through the current export code, weights unchanged.

    python Utilities/reexport_bundled_models.py --model LymphNodeClassifier/Resources/Models/lung_nodule_lidc.pt \\
        [--dataset DATASET --experience-source "what DATASET is"] [--out PATH]

What changes: the card gains the fields the current export writes (`integrity`: weights digest,
input shape, card digest; with `--dataset`, `experience`: the node-size range and patch intensity
statistics of that dataset, extracted with the card's own patch spec and window). What does not:
the weights, every other card field, and the outputs -- the script checks that the new file's
predictions on a random batch equal the old file's bit for bit and that the cards differ only in
the new fields, and leaves the old file in place otherwise. Writes over `--model` unless `--out`.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "LymphNodeClassifier"))

from LymphNodeClassifierLib.dataset import Dataset  # noqa: E402
from LymphNodeClassifierLib.errors import InputError  # noqa: E402
from LymphNodeClassifierLib.model import build_model, export_torchscript, load_model  # noqa: E402
from LymphNodeClassifierLib.patchset import build_patchset  # noqa: E402
from LymphNodeClassifierLib.pipeline import patch_spec_from_card, window_from_card  # noqa: E402

NEW_FIELDS = ("integrity", "experience")


def dataset_experience(card: dict, dataset_folder: str | Path, source: str, cache_dir: str | Path | None = None) -> dict:
    """The `experience` block of `dataset_folder`'s labelled nodes under the card's patch spec and window."""
    patchset = build_patchset(Dataset.load(dataset_folder), patch_spec_from_card(card), window_from_card(card), cache_dir=cache_dir)
    experience = patchset.summary()["experience"]
    if experience is None:
        raise InputError(f"The dataset {dataset_folder} has no labelled node to describe; give the model's training dataset.")
    experience["source"] = source
    return experience


def reexport(model_path: str | Path, out_path: str | Path, experience: dict | None = None) -> dict:
    """Re-export `model_path` to `out_path` (may be the same file); returns the new card."""
    old = load_model(model_path, "cpu")
    card = copy.deepcopy(old.card)
    for field in NEW_FIELDS:
        card.pop(field, None)
    if experience is not None:
        card["experience"] = experience
    elif "experience" in old.card:
        card["experience"] = old.card["experience"]
    eager = build_model(card["architecture"]["name"], old.in_channels, old.patch_size)
    eager.load_state_dict(old.module.state_dict(), strict=True)
    eager.eval()
    batch = torch.rand((16, old.in_channels, old.patch_size, old.patch_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = old.module(batch)
    with tempfile.TemporaryDirectory() as folder:
        candidate = Path(folder) / Path(out_path).name
        export_torchscript(eager, card, candidate)
        new = load_model(candidate, "cpu")
        with torch.no_grad():
            after = new.module(batch)
        if not torch.equal(before, after):
            raise RuntimeError(f"The re-exported model's outputs differ (max {float((before - after).abs().max()):.3g}); nothing was written.")
        kept = {key: value for key, value in new.card.items() if key not in NEW_FIELDS}
        if kept != {key: value for key, value in old.card.items() if key not in NEW_FIELDS}:
            raise RuntimeError("The re-exported card differs from the old one outside the new fields; nothing was written.")
        export_torchscript(eager, card, out_path)  # atomic, under its final name (the archive's folder name)
    return load_model(out_path, "cpu").card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model file to re-export")
    parser.add_argument("--out", help="where to write (default: over --model)")
    parser.add_argument("--dataset", help="the model's training dataset, for the card's experience block")
    parser.add_argument("--experience-source", default="", help="how --dataset relates to the training data (stored in the card)")
    parser.add_argument("--cache", default=None, help="patch cache folder")
    args = parser.parse_args(argv)
    try:
        experience = None
        if args.dataset:
            experience = dataset_experience(load_model(args.model, "cpu").card, args.dataset, args.experience_source or f"dataset {args.dataset}", args.cache)
        card = reexport(args.model, args.out or args.model, experience)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out or args.model}: weights sha256 {card['integrity']['weights_sha256'][:16]}..., input {card['integrity']['input_shape']}"
          + (f", experience from {card['experience']['nodes']} nodes" if "experience" in card else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
