"""One input check, one verdict: every command and the Slicer logic read and check inputs here.

- `read_image(path, what, series_uid)`: an image file or a DICOM series folder. A compressed file
  is checked to be complete first (SimpleITK reads a truncated .nii.gz without error and fills the
  missing slices with 0), so a truncated or corrupt file is refused instead of read as zeros.
- `check_ct(ct, source, policy)`: 3D, one grey value per voxel, finite, not blank
  (`geometry.check_ct_image`) and in Hounsfield units: some voxels must lie in the air / lung
  range, or at least 1 % fat, which a CT stored as HU + 1024 or an MR image has neither of
  (override: `--not-hu-ok`).
- `labels_on_ct(ct, labels, source, policy)`: the label map checked and brought onto the CT grid
  by the geometry policy of `geometry.prepare_label_image` (docs/ARCHITECTURE.md).
- `read_case(ct_path, labels_path, policy)`: the three above in order, as every command runs them.
- `read_ct_and_labels(ct_path, labels_path, series_uid, meanwhile)`: both reads in one background
  thread while `meanwhile()` (loading the model) runs on the calling one.
- `node_warnings(...)`: per node, what a radiologist should know before trusting the probability:
  a size no single lymph node has, a node smaller than the model can see, and a node or patch
  outside the training data the model card describes (`experience`).

Messages are one line naming the file, what was seen and what to do (errors.InputError).
"""

from __future__ import annotations

import argparse
import gzip
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .geometry import check_ct_image, prepare_label_image

try:  # ISA-L's CRC-32 / Adler-32: the same values as zlib's, ~5x faster (a 512x512x110 CT: ~10 vs ~35-55 ms)
    from isal.isal_zlib import adler32 as _adler32, crc32 as _crc32
except ImportError:  # optional: zlib's give the same verdict
    from zlib import adler32 as _adler32, crc32 as _crc32

# A CT in HU has air (-1000) or lung (-900..-500) somewhere; a CT stored without its rescale
# intercept (HU + 1024) or an MR image has no voxel in this range.
HU_AIR_RANGE = (-1200.0, -200.0)
MIN_AIR_FRACTION = 1e-4  # of the voxels: a few stray voxels are not air
# Without air, a crop in HU still has fat (about -100 HU); stored as HU + 1024 fat sits near +924
# and air near +24 (a padding value such as -2000 lies outside both ranges), an MR image has no
# negative values at all.
HU_FAT_RANGE = (-200.0, -30.0)
MIN_FAT_FRACTION = 0.01
# Node size plausibility (radiology): nodal short axes above ~10 mm are enlarged and bulky nodal
# masses reach 50-60 mm; beyond 60 mm short axis (or 250 mL) the mask is a conglomerate, an organ
# or a mis-drawn region, not one lymph node. Below 3 mm short axis a node covers only a few voxels
# of a 0.79 mm patch: too small to classify.
MAX_PLAUSIBLE_SHORT_AXIS_MM = 60.0
MAX_PLAUSIBLE_VOLUME_MM3 = 250_000.0
MIN_CLASSIFIABLE_SHORT_AXIS_MM = 3.0
# Patch intensity: each patch's histogram of windowed values (10 bins on [0, 1]) is compared with
# the training patches' mean histogram (total variation distance, 0..1). A patch farther from it
# than every training patch was looks unlike anything the model was trained on (lung crops under
# the abdominal phantom model: 96 % of them; no training patch by construction).
PATCH_HISTOGRAM_BINS = 10
NOT_HU_OPTION = "--not-hu-ok"
STRICT_GEOMETRY_OPTION = "--strict-geometry"
SERIES_UID_OPTION = "--series-uid"
_CHUNK = 1 << 22


@dataclass(frozen=True)
class InputPolicy:
    """How strict the input check is: the same two options in every command."""

    strict_geometry: bool = False  # refuse a label map on another grid instead of resampling it
    not_hu_ok: bool = False  # accept a CT with neither air/lung nor fat HU values

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "InputPolicy":
        return cls(bool(getattr(args, "strict_geometry", False)), bool(getattr(args, "not_hu_ok", False)))

    def for_case(self, case) -> "InputPolicy":
        """A dataset case imported with --not-hu-ok keeps that verdict in every command (`not_hu_ok` on the case)."""
        extra = getattr(case, "extra", None) or {}
        return InputPolicy(self.strict_geometry, self.not_hu_ok or bool(extra.get("not_hu_ok", False)))


def add_input_options(parser: argparse.ArgumentParser, series_uid: bool = False) -> None:
    """The input-policy options, named the same in every command."""
    parser.add_argument(STRICT_GEOMETRY_OPTION, action="store_true",
                        help="refuse a label map whose grid differs from the CT's instead of resampling it")
    parser.add_argument(NOT_HU_OPTION, action="store_true",
                        help="accept a CT with neither air/lung (-1200..-200 HU) nor fat (-200..-30 HU), e.g. a tight crop of an organ")
    if series_uid:
        parser.add_argument(SERIES_UID_OPTION, default=None,
                            help="SeriesInstanceUID to read when the CT folder holds several DICOM series")


# --------------------------------------------------------------------------------------------
# reading


def read_image(path: str | os.PathLike, what: str = "CT", series_uid: str | None = None) -> sitk.Image:
    """Read an image file, checked complete, or, for a folder, its DICOM series.

    A raw file is checked by its size before the read; a compressed one by its stream's own
    checksum against the voxels read (`_StoredChecksum`), and only when they differ by the full
    second decompression of `check_complete`, which gives the verdict.
    """
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path, what, series_uid)
    if not path.is_file():
        raise InputError(f"The {what} file {path} does not exist; check the path.")
    if series_uid is not None:
        raise InputError(f"{SERIES_UID_OPTION} applies to a DICOM series folder, but the {what} {path} is a file; leave it out.")
    stored = _stored_checksum(path)
    if stored is None:  # raw data (checked by its size before the read) or a compressed layout checked the long way
        check_complete(path, what)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        if stored is not None:
            check_complete(path, what)  # a cut-off or damaged stream is named as such
        raise InputError(
            f"The {what} file {path} cannot be read as an image ({_first_line(error)}); use NRRD, NIfTI, MHA or a DICOM series folder."
        ) from None
    if stored is not None and not stored.matches(sitk.GetArrayViewFromImage(image)):
        # A truncated or damaged stream, or a complete one whose voxels ITK changed (scaled NIfTI
        # values, big-endian data): the full check refuses the first and passes the second.
        check_complete(path, what)
    return image


Meanwhile = TypeVar("Meanwhile")


def read_ct_and_labels(
    ct_path: str | os.PathLike, labels_path: str | os.PathLike, series_uid: str | None = None,
    meanwhile: Callable[[], Meanwhile] | None = None,
) -> tuple[sitk.Image, sitk.Image, Meanwhile | None]:
    """`read_image` of the CT, then of the label map, and the result of `meanwhile()`.

    With `meanwhile` (e.g. loading the model), the two reads run in one background thread while it
    runs on this one: ITK's readers and the checksums release the GIL, so on a second core the
    reads cost no extra time. One reader thread, never two: some of ITK's image readers are not
    safe to run concurrently (SimpleITK issue #74). Errors come as in the sequential order
    `meanwhile()`, CT, label map: `meanwhile`'s first, then the CT's (the label map is then not read).
    """
    if meanwhile is None:
        return read_image(ct_path, "CT", series_uid), read_image(labels_path, "label"), None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-case") as pool:
        images = pool.submit(lambda: (read_image(ct_path, "CT", series_uid), read_image(labels_path, "label")))
        result = meanwhile()
        ct, labels = images.result()
    return ct, labels, result


@dataclass(frozen=True)
class _StoredChecksum:
    """What a compressed file's trailer says its whole uncompressed stream was (gzip: CRC-32 and
    length mod 2**32; zlib: Adler-32), to compare with the voxels ITK decompressed: one
    decompression verifies the file instead of a second one of its own (`check_complete`)."""

    adler32: bool
    value: int
    length: int | None = None
    prefix: bytes = b""  # stream bytes before the voxels (a .nii.gz's header and extensions)

    def matches(self, voxels: np.ndarray) -> bool:
        if not voxels.flags.c_contiguous:
            return False
        if self.adler32:
            return _adler32(voxels, _adler32(self.prefix)) == self.value
        return (len(self.prefix) + voxels.nbytes) % (1 << 32) == self.length and _crc32(voxels, _crc32(self.prefix)) == self.value


def _stored_checksum(path: Path) -> _StoredChecksum | None:
    """The trailer checksum of a single-stream compressed image file (.nii.gz, gzip NRRD, compressed MHA), else None."""
    name = path.name.lower()
    size = path.stat().st_size
    if name.endswith(".nii.gz"):
        offset = _nifti_data_offset(path)
        if offset is None or not 348 <= offset <= 1 << 24 or size < 18:
            return None
        try:
            with gzip.open(path, "rb") as stream:
                prefix = stream.read(offset)
        except (OSError, EOFError, zlib.error):
            return None
        if len(prefix) != offset:
            return None
        data_start = 0
    elif name.endswith(".nrrd"):
        data_start, fields = _text_header(path, b"\n\n", ":")
        if (data_start is None or fields.get("data file") or fields.get("datafile") or fields.get("encoding") not in ("gzip", "gz")
                or fields.get("byte skip", "0") != "0" or fields.get("line skip", "0") != "0"):
            return None
        prefix = b""
    elif name.endswith(".mha"):
        data_start, fields = _text_header(path, b"ElementDataFile = LOCAL\n", "=")
        if data_start is None or fields.get("compresseddata", "false") != "true":
            return None
        declared = fields.get("compresseddatasize")
        if declared is not None and (not declared.isdigit() or data_start + int(declared) != size):
            return None
        magic, trailer = _stream_ends(path, data_start, 4)
        if size < data_start + 6 or len(magic) < 2 or (magic[0] & 0x0F) != 8 or int.from_bytes(magic, "big") % 31:
            return None  # not one zlib stream
        return _StoredChecksum(adler32=True, value=int.from_bytes(trailer, "big"))
    else:
        return None
    magic, trailer = _stream_ends(path, data_start, 8)
    if magic != b"\x1f\x8b" or size < data_start + 18:
        return None  # not a gzip stream (a zlib-wrapped NRRD is checked the long way)
    return _StoredChecksum(adler32=False, value=int.from_bytes(trailer[:4], "little"), length=int.from_bytes(trailer[4:], "little"), prefix=prefix)


def _stream_ends(path: Path, data_start: int, trailer_bytes: int) -> tuple[bytes, bytes]:
    """The compressed stream's first two bytes (its format's magic) and the file's last `trailer_bytes`."""
    with open(path, "rb") as stream:
        stream.seek(data_start)
        magic = stream.read(2)
        stream.seek(-min(trailer_bytes, path.stat().st_size), os.SEEK_END)
        return magic, stream.read(trailer_bytes)


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:120]


def _expected_bytes(path: Path) -> int | None:
    """Voxel bytes the header announces (size x components x component size), None if unknown."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None  # the real read reports it
    component = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID()).GetSizeOfPixelComponent()
    return int(np.prod(reader.GetSize(), dtype=np.int64)) * reader.GetNumberOfComponents() * component


def _incomplete(path: Path, what: str, detail: str) -> InputError:
    return InputError(f"The {what} file {path} is incomplete or corrupt ({detail}); copy the file again from its source.")


def _inflate(path: Path, what: str, offset: int, wbits: int) -> int:
    """Decompress the stream from `offset` to its end marker (checksum verified); its length in bytes."""
    inflater = zlib.decompressobj(wbits)
    total = 0
    with open(path, "rb") as stream:
        stream.seek(offset)
        try:
            while not inflater.eof:
                chunk = stream.read(_CHUNK)
                if not chunk:
                    raise _incomplete(path, what, f"the compressed data ends after {total} bytes without its end marker: a truncated copy?")
                total += len(inflater.decompress(chunk))
                while inflater.unconsumed_tail and not inflater.eof:
                    total += len(inflater.decompress(inflater.unconsumed_tail))
        except zlib.error as error:
            raise _incomplete(path, what, f"compressed data error: {error}") from None
    return total


def _nifti_data_offset(path: Path) -> int | None:
    """vox_offset of a .nii.gz (NIfTI-1 or -2 header), read from the first bytes of the stream."""
    try:
        with gzip.open(path, "rb") as stream:
            head = stream.read(540)
    except (OSError, EOFError, zlib.error):
        return None
    for order in ("<", ">"):
        if len(head) >= 348 and int(np.frombuffer(head[:4], f"{order}i4")[0]) == 348:
            return int(np.frombuffer(head[108:112], f"{order}f4")[0])
        if len(head) >= 540 and int(np.frombuffer(head[:4], f"{order}i4")[0]) == 540:
            return int(np.frombuffer(head[168:176], f"{order}i8")[0])
    return None


def _full_gzip_pass(path: Path, what: str) -> int:
    try:
        with gzip.open(path, "rb") as stream:
            total = 0
            while chunk := stream.read(_CHUNK):
                total += len(chunk)
    except EOFError:
        raise _incomplete(path, what, "the gzip stream ends before its end marker: a truncated copy?") from None
    except (OSError, zlib.error) as error:
        raise _incomplete(path, what, f"gzip error: {error}") from None
    return total


def check_complete(path: str | os.PathLike, what: str = "CT") -> None:
    """Refuse a compressed image whose stream is cut short or corrupt, or a raw one shorter than its header says.

    Compressed data is decompressed once to its end marker with its checksum verified: ITK reads a
    truncated stream as zeros and a damaged one as garbage without an error, and neither the file
    size nor the gzip trailer shows damage inside the stream. This costs about one more
    decompression (~1.3x the read of a gzip NRRD); raw data is checked by the file's size.
    """
    path = Path(path)
    name = path.name.lower()
    expected = _expected_bytes(path)
    if expected is None:
        return  # no readable header: not an image at all, which the reader itself reports
    if name.endswith(".gz"):
        offset = _nifti_data_offset(path) if name.endswith(".nii.gz") else None
        total = _full_gzip_pass(path, what)
        if offset is not None and total < offset + expected:
            raise _incomplete(path, what, f"{total - offset} voxel bytes, the header announces {expected}")
        return
    if name.endswith(".nrrd"):
        header_end, fields = _text_header(path, b"\n\n", ":")
        if header_end is None or fields.get("data file") or fields.get("datafile"):
            return  # detached data or no header: the reader reports what is wrong
        encoding = fields.get("encoding", "raw")
        if encoding in ("gzip", "gz"):
            total = _inflate(path, what, header_end, 47)
        elif encoding == "raw":
            total = path.stat().st_size - header_end
        else:
            return
    elif name.endswith(".mha"):
        header_end, fields = _text_header(path, b"ElementDataFile = LOCAL\n", "=")
        if header_end is None:
            return
        if fields.get("compresseddata", "false").lower() == "true":
            total = _inflate(path, what, header_end, 47)
        else:
            total = path.stat().st_size - header_end
    elif name.endswith(".nii"):
        total = path.stat().st_size - 352
    else:
        return
    if total < expected:
        raise _incomplete(path, what, f"{total} voxel bytes, the header announces {expected}")


def _text_header(path: Path, end: bytes, separator: str) -> tuple[int | None, dict[str, str]]:
    """(byte offset where the data starts, lower-cased header fields) of a text-header image file."""
    with open(path, "rb") as stream:
        head = stream.read(1 << 16)
    position = head.find(end)
    if position < 0:
        return None, {}
    fields = {}
    for line in head[:position + len(end)].decode("latin-1").splitlines():
        if separator in line and not line.startswith("#"):
            key, value = line.split(separator, 1)
            fields[key.strip().lower()] = value.strip().lower() if key.strip().lower() != "data file" else value.strip()
    return position + len(end), fields


def dicom_series(folder: str | os.PathLike) -> dict[str, list[str]]:
    """SeriesInstanceUID -> its files ordered by slice position (GDCM's sorter), for one folder."""
    folder = str(folder)
    return {uid: list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid)) for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)}


def _series_description(files: Sequence[str]) -> str:
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return ""
    return reader.GetMetaData("0008|103e").strip() if reader.HasMetaDataKey("0008|103e") else ""


def read_dicom_series(folder: Path, what: str = "CT", series_uid: str | None = None) -> sitk.Image:
    """One DICOM series of `folder` as a 3D image: slices ordered by position, rescale slope/intercept applied (GDCM)."""
    series = dicom_series(folder)
    if not series:
        raise InputError(f"The {what} folder {folder} holds no DICOM series; give a folder of DICOM files or an image file (NRRD, NIfTI, MHA).")
    if series_uid is None and len(series) > 1:
        listing = "; ".join(f"{uid} ({len(files)} files{', ' + d if (d := _series_description(files)) else ''})" for uid, files in series.items())
        raise InputError(f"The {what} folder {folder} holds {len(series)} DICOM series: {listing}; choose one with {SERIES_UID_OPTION}.")
    if series_uid is not None and series_uid not in series:
        raise InputError(f"The {what} folder {folder} has no DICOM series {series_uid}; its series are: {', '.join(series)}.")
    files = series[series_uid] if series_uid is not None else next(iter(series.values()))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise InputError(f"The DICOM series in {folder} cannot be read ({_first_line(error)}); check that its files are complete.") from None


# --------------------------------------------------------------------------------------------
# checks


def _naming(error: InputError, source: str | os.PathLike) -> str:
    """The check's sentence with the file it is about."""
    return f"{str(error).rstrip('.')} ({source})." if str(source) else str(error)


def check_ct(ct: sitk.Image, source: str | os.PathLike = "", policy: InputPolicy = InputPolicy()) -> None:
    """Raise InputError unless `ct` is a usable 3D CT in HU (see the module docstring)."""
    where = f" {source}" if str(source) else ""
    try:
        check_ct_image(ct)
    except InputError as error:
        raise InputError(_naming(error, source)) from None
    if policy.not_hu_ok:
        return
    array = sitk.GetArrayViewFromImage(ct)
    low, high = HU_AIR_RANGE
    step = max(1, array.shape[0] // 16)  # a sample first (16 slices, every 4th voxel in-plane); the full volume before refusing
    for sample in (array[::step, ::4, ::4], array):
        if np.count_nonzero((sample >= low) & (sample <= high)) >= max(1, MIN_AIR_FRACTION * sample.size):
            return
        fat_low, fat_high = HU_FAT_RANGE
        if np.count_nonzero((sample >= fat_low) & (sample <= fat_high)) >= MIN_FAT_FRACTION * sample.size:
            return  # no air, but fat: a tight soft-tissue crop in HU
    lowest, p50, highest = (float(v) for v in np.percentile(array[::step], [0, 50, 100]))
    raise InputError(
        f"The CT{where} does not look like a CT in Hounsfield units: values {lowest:g}..{highest:g} (median {p50:g}) "
        f"with no voxel in the air/lung range {low:g}..{high:g} HU and almost none in the fat range {HU_FAT_RANGE[0]:g}..{HU_FAT_RANGE[1]:g} HU: "
        f"is the rescale slope/intercept applied? is it an MR image? Use the CT in HU, or pass {NOT_HU_OPTION} if it is in HU."
    )


def labels_on_ct(ct: sitk.Image, labels: sitk.Image, source: str | os.PathLike = "", policy: InputPolicy = InputPolicy()) -> tuple[sitk.Image, list[str]]:
    """The label map checked and on the CT grid (geometry policy), and the notes saying what was done."""
    try:
        on_ct, _, note = prepare_label_image(ct, labels, strict_geometry=policy.strict_geometry)
    except InputError as error:
        raise InputError(_naming(error, source)) from None
    return on_ct, [note] if note else []


@dataclass
class CheckedCase:
    ct: sitk.Image
    labels_on_ct: sitk.Image
    notes: list[str]


def read_case(
    ct_path: str | os.PathLike, labels_path: str | os.PathLike, policy: InputPolicy = InputPolicy(), series_uid: str | None = None,
) -> CheckedCase:
    """Read and check a CT (file or DICOM folder) and its label map the way every command does."""
    ct = read_image(ct_path, "CT", series_uid)
    check_ct(ct, ct_path, policy)
    labels = read_image(labels_path, "label")
    on_ct, notes = labels_on_ct(ct, labels, labels_path, policy)
    return CheckedCase(ct, on_ct, notes)


# --------------------------------------------------------------------------------------------
# per-node warnings


def size_warnings(node) -> list[str]:
    """What the node's size alone says: not one lymph node, or too small to classify."""
    out = []
    if node.short_axis_mm > MAX_PLAUSIBLE_SHORT_AXIS_MM or node.volume_mm3 > MAX_PLAUSIBLE_VOLUME_MM3:
        out.append(
            f"implausible size for one lymph node (short axis {node.short_axis_mm:.0f} mm, volume {node.volume_mm3 / 1000:.0f} mL; "
            f"bulky nodes stay below {MAX_PLAUSIBLE_SHORT_AXIS_MM:g} mm): check the mask (a conglomerate, an organ?); the probability is not meaningful"
        )
    elif node.short_axis_mm < MIN_CLASSIFIABLE_SHORT_AXIS_MM:
        out.append(f"short axis {node.short_axis_mm:.1f} mm, below {MIN_CLASSIFIABLE_SHORT_AXIS_MM:g} mm: too small to classify reliably")
    return out


def patch_means(images: np.ndarray, channels: int | None = None) -> np.ndarray:
    """Per-patch mean of the image channels (mask channel left out), `images` (N, C, H, W) in [0, 1]."""
    images = np.asarray(images)
    return images[:, :channels].reshape(len(images), -1).mean(axis=1) if len(images) else np.zeros(0)


def patch_histograms(images: np.ndarray, channels: int | None = None) -> np.ndarray:
    """(N, PATCH_HISTOGRAM_BINS) fraction of each patch's pixels per bin of [0, 1] (mask channel left out)."""
    images = np.asarray(images)
    flat = images[:, :channels].reshape(len(images), -1)
    bins = np.minimum((flat * PATCH_HISTOGRAM_BINS).astype(np.int64), PATCH_HISTOGRAM_BINS - 1)
    offsets = bins + PATCH_HISTOGRAM_BINS * np.arange(len(images))[:, None]
    counts = np.bincount(offsets.ravel(), minlength=PATCH_HISTOGRAM_BINS * len(images)).reshape(len(images), PATCH_HISTOGRAM_BINS)
    return counts / max(flat.shape[1], 1)


def histogram_distance(histograms: np.ndarray, reference) -> np.ndarray:
    """Total variation distance (0: same, 1: disjoint) of each histogram to `reference`."""
    return 0.5 * np.abs(np.asarray(histograms) - np.asarray(reference)[None]).sum(axis=1)


def training_experience(short_axis_mm: np.ndarray, long_axis_mm: np.ndarray, images: np.ndarray, image_channels: int, source: str) -> dict:
    """The card's `experience` block: the training nodes' size range and patch intensity statistics."""
    means = patch_means(images, image_channels)
    histograms = patch_histograms(images, image_channels) if len(means) else None
    if not len(means):
        raise InputError("There are no training patches to describe; train on a dataset with labelled nodes.")

    def value_range(values) -> list[float]:
        return [round(float(np.min(values)), 3), round(float(np.max(values)), 3)]

    return {
        "nodes": int(len(means)),
        "source": source,
        "short_axis_mm": value_range(short_axis_mm),
        "long_axis_mm": value_range(long_axis_mm),
        "patch_mean": {
            "range": value_range(means),
            "mean": round(float(means.mean()), 4),
            "sd": round(float(means.std()), 4),
            "p01": round(float(np.percentile(means, 1)), 4),
            "p99": round(float(np.percentile(means, 99)), 4),
        },
        "patch_histogram": {
            "bins": PATCH_HISTOGRAM_BINS,
            "mean": [round(float(v), 5) for v in histograms.mean(axis=0)],
            # rounded up, so that no training patch lies beyond the stored value
            "distance_max": float(np.ceil(histogram_distance(histograms, histograms.mean(axis=0)).max() * 1e4) / 1e4),
            "distance_p99": round(float(np.percentile(histogram_distance(histograms, histograms.mean(axis=0)), 99)), 4),
        },
        "patch_mean_channels": int(image_channels),
    }


def experience_warnings(card: dict, node, patch_image: np.ndarray | None) -> list[str]:
    """A node larger or smaller than every training node, or a patch far from the training intensities."""
    experience = card.get("experience")
    if not isinstance(experience, dict):
        return []
    out = []
    low, high = experience.get("short_axis_mm", [None, None])
    if low is not None and not low <= node.short_axis_mm <= high:
        out.append(f"short axis {node.short_axis_mm:.1f} mm is outside the model's training range {low:g}..{high:g} mm")
    stats = experience.get("patch_histogram")
    if isinstance(stats, dict) and patch_image is not None and stats.get("bins") == PATCH_HISTOGRAM_BINS:
        channels = experience.get("patch_mean_channels")
        distance = float(histogram_distance(patch_histograms(patch_image[None], channels), stats["mean"])[0])
        if distance > float(stats["distance_max"]):
            mean = float(patch_means(patch_image[None], channels)[0])
            out.append(
                f"patch intensities unlike every training patch (histogram distance {distance:.2f} > {float(stats['distance_max']):.2f}, "
                f"mean {mean:.2f} in window units): a different body region, window or scanner than the model knows"
            )
    return out


def node_warnings(card: dict, nodes, patches) -> list[list[str]]:
    """One list of warnings per node (same order as `nodes`)."""
    images = {patch.node.node_id: patch.image for patch in patches}
    return [size_warnings(node) + experience_warnings(card, node, images.get(node.node_id)) for node in nodes]
