"""One decompression per compressed input file, and model calls without TorchScript's optimisation pass.

`validate.read_image` lets ITK decompress a compressed image and compares the voxels it read with
the checksum the file's own trailer stores (gzip CRC-32 + length, zlib Adler-32); only when they
differ does the full second decompression (`check_complete`) decide. These tests show that the
checksum agrees for complete files of each format (so the second pass is skipped), disagrees for
cut-off or damaged ones (so the full check refuses them), and that a complete file whose voxels ITK
changes on reading (big-endian data) still passes through the full check.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from LymphNodeClassifierLib import validate
from LymphNodeClassifierLib.errors import InputError
from LymphNodeClassifierLib.inference import predict_logits
from LymphNodeClassifierLib.model import load_model
from helpers import export_untrained_model

COMPRESSED = (".nii.gz", ".nrrd", ".mha")


def ct_image(shape=(24, 96, 96), seed=3) -> sitk.Image:
    array = np.random.default_rng(seed).integers(-1024, 1500, size=shape).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((-10.0, 20.0, 5.0))
    return image


def stored_matches(path: Path) -> bool:
    stored = validate._stored_checksum(path)
    if stored is None:
        return False
    image = sitk.ReadImage(str(path))  # kept alive while its voxel view is read
    return stored.matches(sitk.GetArrayViewFromImage(image))


@pytest.mark.parametrize("suffix", COMPRESSED)
def test_complete_compressed_file_is_verified_by_its_own_checksum(tmp_path, suffix):
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(ct_image(), str(path), True)
    assert stored_matches(path)
    read = validate.read_image(path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), sitk.GetArrayFromImage(ct_image()))


@pytest.mark.parametrize("suffix", COMPRESSED)
@pytest.mark.parametrize("damage", ["cut", "zeroed"])
def test_cut_or_damaged_stream_fails_the_checksum_and_is_refused(tmp_path, suffix, damage):
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(ct_image(), str(path), True)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    if damage == "cut":
        data = data[:middle]
    else:
        data[middle:middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    try:
        assert not stored_matches(path)
    except RuntimeError:
        pass  # ITK itself refuses the damaged stream
    with pytest.raises(InputError, match="incomplete or corrupt"):
        validate.read_image(path)


def test_raw_file_has_no_stored_checksum_and_is_checked_by_size(tmp_path):
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(ct_image(), str(path), False)
    assert validate._stored_checksum(path) is None
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(InputError, match="incomplete or corrupt"):
        validate.read_image(path)


def test_big_endian_nrrd_differs_from_its_stream_and_passes_the_full_check(tmp_path):
    """ITK swaps big-endian voxels to the machine's order: the checksum cannot match, the full check accepts the file."""
    array = sitk.GetArrayFromImage(ct_image())
    header = (
        "NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\n"
        f"sizes: {array.shape[2]} {array.shape[1]} {array.shape[0]}\n"
        "space directions: (0.7,0,0) (0,0.8,0) (0,0,2.5)\nkinds: domain domain domain\n"
        "endian: big\nencoding: gzip\nspace origin: (-10,20,5)\n\n"
    )
    path = tmp_path / "big.nrrd"
    path.write_bytes(header.encode() + gzip.compress(array.astype(">i2").tobytes()))
    assert not stored_matches(path)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(validate.read_image(path)), array)
    path.write_bytes(path.read_bytes()[:-200])  # and cut short, it is still refused
    with pytest.raises(InputError, match="incomplete or corrupt"):
        validate.read_image(path)


def test_model_calls_run_unoptimised_and_give_the_optimised_executors_logits(tmp_path):
    """predict runs the TorchScript interpreter without the optimisation pass (flag restored afterwards)
    and returns what the default, optimising executor returns once warmed up."""
    model = load_model(export_untrained_model(tmp_path / "m.pt", size=32, spacing_mm=1.0))
    batch = np.random.default_rng(1).random((4, 3, 32, 32), dtype=np.float32)
    assert torch._C._get_graph_executor_optimize()
    logits = predict_logits(model, batch)
    assert torch._C._get_graph_executor_optimize()
    with torch.no_grad():
        for _ in range(3):  # past the profiling runs: the optimised plan
            optimised = model.module(torch.from_numpy(batch)).reshape(-1).numpy()
    np.testing.assert_allclose(logits, optimised, rtol=1e-5, atol=1e-5)
