"""The classification report (`report.png`) and the patch montage, drawn with matplotlib only.

- `write_report`: one tile per node (the axial slice through the node, its outline coloured by
  probability, Grad-CAM in heat colours) with the node's title, a summary table under the tiles and
  a footer saying how the tiles were made. Tiles come from `LymphNodeClassifierLogic.slice_views`
  (real Slicer slice views) when it could render them; otherwise they are drawn here from the
  model's own axial patches (the "patch fallback").
- `patch_montage`: every node's patch views as the model sees them (windowed, in grey), each with
  the node mask's contour and, if given, the Grad-CAM; one row per node, one column per view.

Pure: numpy + matplotlib's Agg canvas (no pyplot, so no global backend is switched), no Qt, no
Slicer, no VTK. Images are oriented like Slicer's slice views (radiological convention: patient
right on the image's left); see `patches` for the views' orientation.
"""

from __future__ import annotations

import datetime
import os
import textwrap
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import __version__
from .fileio import atomic_path
from .nodes import NodeInfo
from .segfile import probability_color

TILE_SOURCE_SLICER = "rendered with 3D Slicer slice views"
TILE_SOURCE_PATCHES = "patch fallback"
TILE_SOURCE_NONE = "no node images"

# Grad-CAM below this is transparent in the report's tiles (slice views and patch fallback alike):
# weak attributions would otherwise tint the whole field and hide the CT.
CAM_DISPLAY_THRESHOLD = 0.2
DEFAULT_CAM_OPACITY = 0.4
TITLE_LINE_IN = 0.3  # height of one more title line
CAM_CLASS_NAMES = ("benign", "metastatic")  # as gradcam.CLASS_NAMES (not imported: this module stays torch-free)
NEUTRAL_NODE_COLOR = (0.0, 0.8, 1.0)  # contour colour when no probability is known

# letters at the (left, right, top, bottom) edges of each view, radiological convention
VIEW_EDGE_LETTERS = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}

_DPI = 100
_TEXT = "#1a1a1a"
_MUTED = "#555555"


@dataclass(frozen=True)
class FigureLayout:
    """What was drawn: grid of images, the PNG's size in pixels and where the tiles came from."""

    rows: int
    columns: int
    width_px: int
    height_px: int
    tile_source: str = ""
    title_lines: tuple[str, ...] = ()  # the title as drawn, wrapped to the figure's width
    tile_captions: tuple[str, ...] = ()  # each node tile's second line (size, label, the class its Grad-CAM explains)


# -- shared drawing helpers ------------------------------------------------------------------------


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=_DPI, facecolor="white")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | os.PathLike) -> tuple[int, int]:
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=_DPI, format="png", facecolor=figure.get_facecolor())
    width, height = figure.canvas.get_width_height()
    return int(width), int(height)


def _axes(figure, left_in: float, bottom_in: float, width_in: float, height_in: float):
    """Axes placed in inches from the figure's bottom-left corner."""
    fig_w, fig_h = figure.get_size_inches()
    return figure.add_axes((left_in / fig_w, bottom_in / fig_h, width_in / fig_w, height_in / fig_h))


def _bare(axis) -> None:
    axis.set_xticks([])
    axis.set_yticks([])


def _frame(axis, color, width: float = 3.0) -> None:
    for spine in axis.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(width)


def _outlined_text(axis, x, y, text, size, **kwargs):
    from matplotlib import patheffects

    return axis.text(
        x, y, text, transform=axis.transAxes, color="white", fontsize=size, fontweight="bold",
        path_effects=[patheffects.withStroke(linewidth=2.2, foreground="black")], **kwargs,
    )


def _edge_letters(axis, view: str, size: float = 9, bottom_letter: bool = True) -> None:
    """Patient directions at the edges; `bottom_letter=False` leaves the bottom to a scale bar."""
    left, right, top, bottom = VIEW_EDGE_LETTERS.get(view, ("", "", "", ""))
    _outlined_text(axis, 0.02, 0.5, left, size, ha="left", va="center")
    _outlined_text(axis, 0.98, 0.5, right, size, ha="right", va="center")
    _outlined_text(axis, 0.5, 0.98, top, size, ha="center", va="top")
    if bottom_letter:
        _outlined_text(axis, 0.5, 0.02, bottom, size, ha="center", va="bottom")


def _node_color(probabilities: Sequence[float] | None, index: int) -> tuple[float, float, float]:
    if probabilities is None:
        return NEUTRAL_NODE_COLOR
    return probability_color(float(probabilities[index]))


def _draw_view(axis, image: np.ndarray, mask: np.ndarray | None, cam: np.ndarray | None, color, pixel_mm: tuple[float, float], cam_opacity: float, linewidth: float) -> None:
    """Windowed image ([0, 1]) in grey, CAM in heat colours, mask contour; pixel (r, c) drawn at row r, column c."""
    rows, columns = image.shape
    height_mm, width_mm = rows * pixel_mm[0], columns * pixel_mm[1]
    extent = (-width_mm / 2, width_mm / 2, height_mm / 2, -height_mm / 2)  # mm from the centre, rows down
    axis.imshow(np.clip(image, 0, 1), cmap="gray", vmin=0.0, vmax=1.0, extent=extent, interpolation="bilinear")
    if cam is not None:
        cam = np.asarray(cam, dtype=np.float32)
        shown = np.ma.masked_less(np.nan_to_num(np.clip(cam, 0, 1)), CAM_DISPLAY_THRESHOLD)
        axis.imshow(shown, cmap="hot", vmin=0.0, vmax=1.0, alpha=cam_opacity, extent=extent, interpolation="bilinear")
    if mask is not None and np.any(mask) and not np.all(mask):
        y = (np.arange(rows) + 0.5) * pixel_mm[0] - height_mm / 2
        x = (np.arange(columns) + 0.5) * pixel_mm[1] - width_mm / 2
        axis.contour(x, y, (np.asarray(mask) > 0).astype(float), levels=[0.5], colors=[color], linewidths=linewidth)
    axis.set_xlim(extent[0], extent[1])
    axis.set_ylim(extent[2], extent[3])
    _bare(axis)


def _patch_pixel_mm(patch, view_index: int) -> tuple[float, float]:
    plane = patch.planes[view_index]
    return float(np.linalg.norm(plane.row_step_lps)), float(np.linalg.norm(plane.col_step_lps))


def _scale_bar(axis, length_mm: float = 10.0) -> None:
    """A `length_mm` bar at the bottom centre (where Slicer's ruler is) of an axis whose data units are mm."""
    x0, x1 = axis.get_xlim()
    y_bottom, y_top = axis.get_ylim()  # rows down: bottom has the larger value
    span = abs(x1 - x0)
    centre = (x0 + x1) / 2
    y = y_bottom - 0.04 * abs(y_bottom - y_top)
    axis.plot([centre - length_mm / 2, centre + length_mm / 2], [y, y], color="white", linewidth=2.0, solid_capstyle="butt")
    axis.text(centre + length_mm / 2 + 0.02 * span, y, f"{length_mm:g} mm", color="white", fontsize=8, ha="left", va="center")


# -- patch montage ---------------------------------------------------------------------------------


def patch_montage(
    patches: Sequence,
    path: str | os.PathLike,
    probabilities: Sequence[float] | None = None,
    titles: Sequence[str] | None = None,
    cams: np.ndarray | Sequence[np.ndarray] | None = None,
    cam_opacity: float = DEFAULT_CAM_OPACITY,
) -> FigureLayout:
    """Write a PNG of every node's patch views as the model sees them; one row per node.

    `patches` are `patches.NodePatch`es; each view shows the windowed patch in grey, the node
    mask's contour in the node's colour (by probability when given) and `cams[n]` (the node's
    2D Grad-CAM, on the patch's pixel grid, shared by its views) in heat colours when given.
    """
    patches = list(patches)
    if not patches:
        raise ValueError("no patches to draw")
    if probabilities is not None and len(probabilities) != len(patches):
        raise ValueError(f"got {len(probabilities)} probabilities for {len(patches)} patches")
    if titles is not None and len(titles) != len(patches):
        raise ValueError(f"got {len(titles)} titles for {len(patches)} patches")
    if cams is not None and len(cams) != len(patches):
        raise ValueError(f"got {len(cams)} CAMs for {len(patches)} patches")
    views = max(len(patch.planes) for patch in patches)
    cell_in, label_in, top_in, gap_in = 1.7, 1.9, 0.45, 0.08
    width_in = label_in + views * (cell_in + gap_in) + 0.1
    height_in = top_in + len(patches) * (cell_in + gap_in) + 0.1
    figure = _figure(width_in, height_in)
    for n, patch in enumerate(patches):
        color = _node_color(probabilities, n)
        bottom = height_in - top_in - (n + 1) * (cell_in + gap_in) + gap_in
        if titles is not None:
            title = titles[n]
        else:
            title = f"Node {patch.node.node_id}"
            if probabilities is not None:
                title += f"\n{round(100 * float(probabilities[n]))} % metastatic"
        figure.text(0.1 / width_in, (bottom + cell_in / 2) / height_in, title, ha="left", va="center", fontsize=10, color=_TEXT)
        for v, plane in enumerate(patch.planes):
            axis = _axes(figure, label_in + v * (cell_in + gap_in), bottom, cell_in, cell_in)
            mask = patch.mask[v] if v < len(patch.mask) else None
            cam = None if cams is None else cams[n]
            _draw_view(axis, patch.image[v], mask, cam, color, _patch_pixel_mm(patch, v), cam_opacity, linewidth=1.5)
            _frame(axis, color, 2.0)
            _edge_letters(axis, plane.name, size=7)
            if n == 0:
                figure.text(
                    (label_in + v * (cell_in + gap_in) + cell_in / 2) / width_in, (height_in - top_in / 2) / height_in,
                    plane.name, ha="center", va="center", fontsize=11, color=_TEXT,
                )
    width_px, height_px = _save(figure, path)
    return FigureLayout(rows=len(patches), columns=views, width_px=width_px, height_px=height_px)


# -- report ----------------------------------------------------------------------------------------


def _fallback_tile(axis, patch, cam, color, cam_opacity: float) -> None:
    """The node's axial patch (the model's view) drawn like a slice-view tile."""
    view = next((v for v, plane in enumerate(patch.planes) if plane.name == "axial"), 0)
    _draw_view(axis, patch.image[view], patch.mask[view], cam, color, _patch_pixel_mm(patch, view), cam_opacity, linewidth=2.0)
    _scale_bar(axis)


def _format_table_rows(nodes, probabilities, predictions) -> tuple[list[str], list[list[str]], bool]:
    any_edge = any(node.touches_edge for node in nodes)
    header = ["Node", "Label value", "Short axis (mm)", "Long axis (mm)", "Volume (mm³)", "P(metastatic)", "Prediction"]
    if any_edge:
        header.append("Note")
    rows = []
    for node, probability, prediction in zip(nodes, probabilities, predictions):
        row = [
            str(node.node_id), str(node.label_value), f"{node.short_axis_mm:.1f}", f"{node.long_axis_mm:.1f}",
            f"{node.volume_mm3:,.0f}", f"{100 * float(probability):.0f} %", "metastatic" if int(prediction) else "benign",
        ]
        if any_edge:
            row.append("touches the CT edge" if node.touches_edge else "")
        rows.append(row)
    return header, rows, any_edge


def _lighter(color, amount: float = 0.55) -> tuple[float, float, float]:
    return tuple(float(c + (1.0 - c) * amount) for c in color)  # type: ignore[return-value]


def _probability_legend(figure, left_in: float, bottom_in: float, width_in: float) -> None:
    axis = _axes(figure, left_in, bottom_in, width_in, 0.14)
    ramp = np.linspace(0, 1, 256)
    axis.imshow(np.array([[probability_color(p) for p in ramp]]), aspect="auto", extent=(0, 1, 0, 1))
    _bare(axis)
    for p in (0.0, 0.5, 1.0):
        axis.text(p, -0.25, f"{round(100 * p)} %", transform=axis.transAxes, ha="center", va="top", fontsize=7.5, color=_MUTED)
    axis.text(-0.02, 0.5, "outline colour = P(metastatic)", transform=axis.transAxes, ha="right", va="center", fontsize=8, color=_MUTED)


def write_report(
    path: str | os.PathLike,
    nodes: Sequence[NodeInfo],
    probabilities: Sequence[float],
    predictions: Sequence[int],
    tiles: Sequence[np.ndarray] | None = None,
    patches: Sequence | None = None,
    cams: np.ndarray | Sequence[np.ndarray] | None = None,
    *,
    threshold: float = 0.5,
    title: str = "Lymph node classification",
    window: tuple[float, float] | None = None,
    field_of_view_mm: float | None = None,
    cam_opacity: float = DEFAULT_CAM_OPACITY,
    notes: Sequence[str] = (),
    cam_classes: Sequence[int] | None = None,
) -> FigureLayout:
    """Write the report PNG (atomically): node tiles with titles, then the summary table and a footer.

    `tiles` are RGB uint8 images from `slice_views.render_node_tiles` (one per node, same order);
    without them the tiles are drawn from `patches` (`NodePatch`, axial view) and `cams` (each
    node's 2D Grad-CAM on its patch grid); with neither, the report holds the table only.
    `window` and `field_of_view_mm` are only quoted in the footer; `notes` are extra footer lines.
    `cam_classes` (1 metastatic, 0 benign per node; `ClassificationResult.cam_classes`) names the
    class each tile's Grad-CAM explains. A long title is wrapped (up to three lines), not cut.
    """
    nodes = list(nodes)
    n = len(nodes)
    if len(probabilities) != n or len(predictions) != n:
        raise ValueError(f"got {len(probabilities)} probabilities and {len(predictions)} predictions for {n} nodes")
    if tiles is not None and len(tiles) != n:
        raise ValueError(f"got {len(tiles)} tiles for {n} nodes")
    if tiles is None and patches is not None and len(patches) != n:
        raise ValueError(f"got {len(patches)} patches for {n} nodes")
    if cams is not None and tiles is None and patches is not None and len(cams) != n:
        raise ValueError(f"got {len(cams)} CAMs for {n} nodes")
    if cam_classes is not None and len(cam_classes) != n:
        raise ValueError(f"got {len(cam_classes)} Grad-CAM classes for {n} nodes")

    if tiles is not None and n:
        source = TILE_SOURCE_SLICER
        tiles = [np.asarray(tile) for tile in tiles]
        tile_in = float(np.clip(max(tile.shape[1] for tile in tiles) / _DPI, 2.4, 4.0))
    elif patches is not None and n:
        source = TILE_SOURCE_PATCHES
        tile_in = 3.2
    else:
        source = TILE_SOURCE_NONE
        tile_in = 0.0

    columns = min(n, 4) if source != TILE_SOURCE_NONE else 0
    tile_rows = -(-n // columns) if columns else 0
    margin_in, title_in, tile_title_in, gap_in = 0.35, 0.75, 0.55, 0.2
    header, rows, _ = _format_table_rows(nodes, probabilities, predictions)
    row_in = 0.27
    table_in = row_in * (len(rows) + 1)
    width_in = max(2 * margin_in + columns * tile_in + max(columns - 1, 0) * gap_in, 8.6)
    if source == TILE_SOURCE_SLICER:
        how = f"Tiles {source}: axial slice through each node's centroid"
        if field_of_view_mm:
            how += f", {field_of_view_mm:g} mm field of view (wider for a node that would not fit)"
    elif source == TILE_SOURCE_PATCHES:
        how = f"Tiles: {source} (3D Slicer slice views unavailable): the model's axial input patch of each node"
    else:
        how = "No node images (neither slice views nor patches were available)"
    if window is not None and source != TILE_SOURCE_NONE:
        how += f", window {window[0]:g} to {window[1]:g} HU"
    how += ". Radiological convention: patient right on the image's left."
    explained = "each node's predicted class" if cam_classes is None else _explained_classes_text(cam_classes, predictions)
    lines = [
        how,
        f"Outline colour: probability of metastasis; heat overlay: Grad-CAM of {explained} "
        f"(where the model found evidence for it). Predicted metastatic when P ≥ {100 * threshold:.0f} %.",
        *notes,
        f"LymphNodeClassifier {__version__}, {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}. "
        "Research use only: not a diagnosis.",
    ]
    # wrapped to the figure's width (8.5 pt text: about 15 characters per inch)
    lines = [part for line in lines for part in textwrap.wrap(line, width=int((width_in - 2 * margin_in) * 15)) or [""]]
    title_lines = _title_lines(title, width_in - 2 * margin_in)
    title_in += TITLE_LINE_IN * (len(title_lines) - 1)
    footer_in = 0.8 + 0.2 * len(lines)
    height_in = title_in + tile_rows * (tile_title_in + tile_in + gap_in) + 0.25 + table_in + footer_in
    figure = _figure(width_in, height_in)

    # title
    top = height_in - 0.3
    for k, line in enumerate(title_lines):
        figure.text(margin_in / width_in, top / height_in, line, ha="left", va="center", fontsize=16, fontweight="bold", color=_TEXT)
        top -= TITLE_LINE_IN if k < len(title_lines) - 1 else 0.0
    n_positive = int(np.sum(np.asarray(predictions, dtype=int)))
    summary = f"{n} node{'s' if n != 1 else ''} · {n_positive} predicted metastatic (P ≥ {100 * threshold:.0f} %)"
    figure.text(margin_in / width_in, (top - 0.3) / height_in, summary, ha="left", va="center", fontsize=10.5, color=_MUTED)

    # tiles, centred horizontally
    grid_width = columns * tile_in + max(columns - 1, 0) * gap_in
    grid_left = (width_in - grid_width) / 2
    captions: list[str] = []
    for index, node in enumerate(nodes if columns else []):
        row, column = divmod(index, columns)
        left = grid_left + column * (tile_in + gap_in)
        bottom = height_in - title_in - (row + 1) * (tile_title_in + tile_in + gap_in) + gap_in
        probability = float(probabilities[index])
        color = probability_color(probability)
        axis = _axes(figure, left, bottom, tile_in, tile_in)
        if source == TILE_SOURCE_SLICER:
            axis.imshow(tiles[index], interpolation="nearest" if tiles[index].shape[1] == round(tile_in * _DPI) else "antialiased")
            _bare(axis)
        else:
            _fallback_tile(axis, patches[index], None if cams is None else cams[index], color, cam_opacity)
        _frame(axis, color, 3.0)
        _edge_letters(axis, "axial", size=10, bottom_letter=False)  # the bottom holds the scale bar
        centre_x = (left + tile_in / 2) / width_in
        figure.text(centre_x, (bottom + tile_in + 0.36) / height_in, f"Node {node.node_id} — {round(100 * probability)} % metastatic",
                    ha="center", va="center", fontsize=12, fontweight="bold", color=_TEXT)
        caption = f"short axis {node.short_axis_mm:.1f} mm · label {node.label_value}"
        if cam_classes is not None:
            caption += f" · CAM: {CAM_CLASS_NAMES[int(cam_classes[index])]}"
        captions.append(caption)
        figure.text(centre_x, (bottom + tile_in + 0.13) / height_in, caption, ha="center", va="center", fontsize=9.5, color=_MUTED)

    # summary table
    table_top = height_in - title_in - tile_rows * (tile_title_in + tile_in + gap_in) - 0.15
    table_axis = _axes(figure, margin_in, table_top - table_in, width_in - 2 * margin_in, table_in)
    table_axis.axis("off")
    if rows:
        table = table_axis.table(cellText=rows, colLabels=header, loc="upper center", cellLoc="center", bbox=(0, 0, 1, 1))
        table.auto_set_font_size(False)
        table.set_fontsize(9.5)
        probability_column = header.index("P(metastatic)")
        prediction_column = header.index("Prediction")
        for (row, column), cell in table.get_celld().items():
            cell.set_edgecolor("#c8c8c8")
            if row == 0:
                cell.set_facecolor("#ececec")
                cell.set_text_props(fontweight="bold", color=_TEXT)
                continue
            if column in (probability_column, prediction_column):
                cell.set_facecolor(_lighter(probability_color(float(probabilities[row - 1])), 0.6))
            if column == prediction_column and int(predictions[row - 1]):
                cell.set_text_props(fontweight="bold")
    else:
        table_axis.text(0.5, 0.5, "No lymph nodes in the label map.", ha="center", va="center", fontsize=11, color=_TEXT)

    # footer
    footer_top = table_top - table_in - 0.22
    for k, line in enumerate(lines):
        figure.text(margin_in / width_in, (footer_top - 0.2 * k) / height_in, line, ha="left", va="top", fontsize=8.5, color=_MUTED)
    if n:
        _probability_legend(figure, width_in - margin_in - 2.0, max(footer_top - 0.2 * len(lines) - 0.3, 0.12), 2.0)

    width_px, height_px = _save(figure, path)
    return FigureLayout(
        rows=tile_rows, columns=columns, width_px=width_px, height_px=height_px, tile_source=source,
        title_lines=tuple(title_lines), tile_captions=tuple(captions),
    )


def _title_lines(title: str, width_in: float) -> list[str]:
    """The title wrapped to `width_in` (16 pt bold: about 6.5 characters per inch), at most three
    lines; only a title longer than that is shortened, at the end of its last line."""
    width = max(int(width_in * 6.5), 10)
    lines = textwrap.wrap(title, width=width) or [""]
    if len(lines) > 3:
        lines = [*lines[:2], textwrap.shorten(" ".join(lines[2:]), width=width, placeholder=" …")]
    return lines


def _explained_classes_text(cam_classes: Sequence[int], predictions: Sequence[int]) -> str:
    classes = [int(c) for c in cam_classes]
    if classes == [int(p) for p in predictions]:
        return "each node's predicted class"
    if len(set(classes)) == 1:
        return f"the {CAM_CLASS_NAMES[classes[0]]} class"
    return "the class named on each tile"
