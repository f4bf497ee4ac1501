"""Browser review station: read, label and classify a dataset's cases from a web page (trame-slicer).

`python -m LymphNodeClassifierLib review --dataset D [--port 8080] [--reader NAME] [--host 127.0.0.1]
[--token T] [--open]` serves one dataset to a browser. The page shows real Slicer slice views
(axial, coronal, sagittal; rendered on the server by trame-slicer's remote-controlled views), the
cases with their read status, the selected case's nodes with the model's probability in its
colour, and the suspect list (`suspects.csv`). Every decision is the Slicer panel's: the station
drives the same Qt-free `controller.PanelController` (selection, loading and classifying a case,
journalled edits through `curation.CurationSession` with the reader's name on every line); this
file only turns browser events into controller calls and draws the controller's state.

Metastatic / Benign are the reader's READ of the node (`PanelController.read` ->
`CurationSession.read_node`): each reader's read is kept beside the others' in the journal and in
the node's `reads`; the dataset label follows them (one reader decides alone, several by
majority, an adjudication stands; see curation.py). The table shows the dataset label, how it was
decided, this reader's read and the other readers'.

Keys (when no text box has the focus): n / arrow down = next node, arrow up = previous node,
m = metastatic, b = benign, x = exclude (with the reason typed in the reason box).

Security:
- binds 127.0.0.1 by default; another address (a LAN address, 0.0.0.0, a host name) is refused
  unless `--token` is given, and then every HTTP request and the websocket must carry it: the
  link `http://host:port/?token=T` sets an HttpOnly, SameSite=Strict cookie that later requests
  (the page's scripts, the websocket) send back (`TokenGuard`);
- without a token (loopback only) the guard still refuses a request whose Host header is not a
  loopback name (DNS rebinding) and a websocket opened from a page of another origin (another web
  site open in the reader's browser);
- the browser names cases and nodes only by their ids in the served dataset; the files opened are
  the ones its dataset.json lists, nothing else can be asked for. The static routes are trame's
  own client files (symbolic links leaving them are not followed).
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import os
import socket
import sys
import time
import webbrowser
from dataclasses import dataclass
from typing import Sequence
from urllib.parse import quote, urlsplit

from LymphNodeClassifierLib.errors import InputError, OneLineArgumentParser

PAGE_TITLE = "Lymph node review"
TOKEN_COOKIE = "lnc_review_token"
VIEW_NAMES = ("Red", "Green", "Yellow")  # axial, coronal, sagittal (Slicer's names for the three slice views)
LAYOUT_ID = "LymphNodeClassifier review"
RCA_FPS = 30.0
RCA_JPEG_QUALITY = 90  # trame-rca's still quality: every frame is sent once, at this quality
NODE_FIELD_OF_VIEW_MM = 80.0  # a clicked node is shown in at least this much of the patient
NODE_FIELD_OF_VIEW_FACTOR = 3.0  # ... or this many times its long axis
KEY_ACTIONS = {"n": "next", "ArrowDown": "next", "ArrowUp": "previous", "m": "metastatic", "b": "benign", "x": "exclude"}

# A window listener: a key typed outside a text box becomes one `review_key` trigger on the server.
KEYBOARD_SCRIPT = """
if (!window.__lncReviewKeys) {
  window.__lncReviewKeys = true;
  const actions = %s;
  window.addEventListener('keydown', (event) => {
    const target = event.target;
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (target && (target.isContentEditable || ['INPUT', 'TEXTAREA', 'SELECT'].includes(target.tagName))) return;
    const action = actions[event.key];
    if (!action || !window.trame) return;
    event.preventDefault();
    window.trame.trigger('review_key', [action]);
  });
}
"""


# ------------------------------------------------------------------------------------------------
# addresses and the token


def is_loopback_host(host: str) -> bool:
    """True for addresses only this machine can reach: 127.0.0.0/8, ::1 and the name localhost."""
    name = str(host).strip().strip("[]")
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to any interface


def check_listen_address(host: str, token: str | None) -> None:
    """Refuse (InputError) to listen on an address other machines can reach without a token."""
    if not str(host).strip():
        raise InputError("The --host address is empty; leave it out to listen on 127.0.0.1 only.")
    if token is not None and not str(token).strip():
        raise InputError("The --token is empty; pass a long random string (e.g. from `python -c 'import secrets; print(secrets.token_urlsafe())'`).")
    if not is_loopback_host(host) and not token:
        raise InputError(
            f"Listening on {host} lets other machines reach the station; add --token T (a long random string the readers "
            "get with the link) or leave --host out to listen on 127.0.0.1 only."
        )


def _host_name(host_header: str) -> str:
    """The host of a Host header ('name:port', '[::1]:port', 'name')."""
    return urlsplit(f"//{host_header}").hostname or ""


class TokenGuard:
    """aiohttp middleware checking every request (HTTP and the websocket's upgrade request).

    With a token: the request must carry it (query `token=`, the cookie, or `Authorization: Bearer`),
    compared in constant time; a request carrying it in the query gets the cookie. Without a token
    (loopback only): the Host header must name a loopback address. Always: a websocket opened from
    a page must come from this server's own origin.
    """

    def __init__(self, token: str | None) -> None:
        self.token = token or None
        self.refused = 0

    def _has_token(self, request) -> bool:
        if self.token is None:
            return True
        header = request.headers.get("Authorization", "")
        candidates = [request.query.get("token"), request.cookies.get(TOKEN_COOKIE),
                      header[7:] if header.startswith("Bearer ") else None]
        expected = self.token.encode("utf-8")
        return any(c is not None and hmac.compare_digest(c.encode("utf-8"), expected) for c in candidates)

    def refusal(self, request) -> str | None:
        """Why the request is refused, or None."""
        if not self._has_token(request):
            return "this review station needs its access token: open the link with ?token=... that you were given"
        if self.token is None and not is_loopback_host(_host_name(request.headers.get("Host", ""))):
            return "this review station answers only to localhost / 127.0.0.1 addresses"
        origin = request.headers.get("Origin")
        if request.headers.get("Upgrade", "").lower() == "websocket" and origin and urlsplit(origin).netloc != request.headers.get("Host", ""):
            return "a web page of another site may not connect to this review station"
        return None

    def middleware(self):
        from aiohttp import web

        @web.middleware
        async def guard(request, handler):
            reason = self.refusal(request)
            if reason is not None:
                self.refused += 1
                return web.Response(status=403, text=f"Forbidden: {reason}.\n")
            response = await handler(request)
            if self.token is not None and request.query.get("token") and not getattr(response, "prepared", False):
                response.set_cookie(TOKEN_COOKIE, self.token, httponly=True, samesite="Strict", path="/")
            return response

        return guard


# ------------------------------------------------------------------------------------------------
# what the page shows (plain values; the trame state holds these)


def _css_colour(probability: float | None) -> str:
    from LymphNodeClassifierLib.segfile import probability_color

    if probability is None or not math.isfinite(probability):
        return "#9e9e9e"
    r, g, b = probability_color(probability)
    return f"rgb({round(255 * r)}, {round(255 * g)}, {round(255 * b)})"


def _whole_number(value, what: str) -> int:
    """A number the page sent (a row's label value): an InputError line, not a traceback, when it is none."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InputError(f"The {what} {value!r} is not a whole number; click a row of the table.") from None
    return number


def _label_text(metastatic: str) -> str:
    return {"1": "metastatic", "0": "benign"}.get(str(metastatic), "unlabelled")


@dataclass
class StartupTimes:
    slicer_app_s: float = 0.0
    dataset_s: float = 0.0
    ui_s: float = 0.0


# ------------------------------------------------------------------------------------------------
# the station


class ReviewStation:
    """One dataset served to a browser: a trame server, a headless Slicer app and the panel's controller."""

    def __init__(self, dataset_folder: str | os.PathLike, reader: str | None = None, token: str | None = None,
                 server_name: str | None = None, models_folder: str | os.PathLike | None = None) -> None:
        start = time.perf_counter()
        self.times = StartupTimes()
        self.guard = TokenGuard(token)
        from .slice_views import SliceViewsUnavailable, require_offscreen_opengl

        try:
            require_offscreen_opengl()
        except SliceViewsUnavailable as error:
            raise InputError(f"The review station cannot render Slicer views here: {error}; run it on a machine with "
                             "an OpenGL driver (EGL or OSMesa without a display).") from None
        os.environ.setdefault("TRAME_ARGS", "")  # trame must not parse this command's own options as its own
        from trame.app import get_server
        from trame_slicer import module as trame_slicer_module
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.app.ui import create_vertical_slice_view_gutter_ui
        from trame_slicer.rca_view import RemoteViewFactory
        from trame_slicer.views import Layout, LayoutDirection, NoScheduleRendering, SliceView, ViewLayoutDefinition, ViewType

        from .controller import PanelController

        self.server = get_server(server_name or f"lymph-node-review-{os.getpid()}-{id(self)}", client_type="vue3")
        self.server.enable_module(trame_slicer_module)
        self.state, self.ctrl = self.server.state, self.server.controller
        self.server.controller.on_server_bind.add(self._on_server_bind)

        import vtk

        # trame-slicer observes the interactor's WindowResizeEvent, which VTK 9.6 warns about once per
        # view (as in slice_views); keep that deprecation notice out of the command's output.
        warnings_shown = vtk.vtkObject.GetGlobalWarningDisplay()
        vtk.vtkObject.GlobalWarningDisplayOff()
        try:
            self.slicer_app = SlicerApp()
            # Remote (RCA) slice views as trame-slicer's register_rca_factories makes them, except:
            # - no rendering while a view is being built (its default direct rendering draws ~60 frames
            #   nobody sees, ~1.2 s a view); the factory then installs the RCA render strategy;
            # - one full-quality frame per change, at up to 30 frames/s even when the mouse is not over
            #   the views (a click in the node table): the defaults re-render a still frame later and
            #   throttle unfocused views to 10/s, which adds up to 0.1 s to a row click.
            def quiet_slice_view(**kwargs):
                return SliceView(scheduled_render_strategy=NoScheduleRendering(), **kwargs)

            self.slicer_app.view_manager.register_factory(RemoteViewFactory(
                self.server, quiet_slice_view, ViewType.SLICE_VIEW, populate_view_ui_f=create_vertical_slice_view_gutter_ui,
                target_fps=RCA_FPS, blur_fps=RCA_FPS, interactive_quality=RCA_JPEG_QUALITY))
            self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
            views = [ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view(), ViewLayoutDefinition.sagittal_view()]
            self.layout_manager.register_layout(LAYOUT_ID, Layout(LayoutDirection.Horizontal, views))
            self.layout_manager.set_layout(LAYOUT_ID)
        finally:
            vtk.vtkObject.SetGlobalWarningDisplay(warnings_shown)
        for view in self.slice_views():
            # no multisampling: a slice view is a textured plane, and 4-8x MSAA on a CPU (Mesa) renderer
            # costs ~40 % of a row click (0.13 -> 0.08 s of CPU for three views); exact colours too,
            # as in the report's tiles. Applied when the page sizes the views (framebuffers are remade).
            view.render_window().SetMultiSamples(0)
        self.times.slicer_app_s = time.perf_counter() - start

        mark = time.perf_counter()
        self.controller = PanelController(self.slicer_app.scene, models_folder=models_folder, user=reader)
        self.controller.open_dataset(str(dataset_folder))
        self.reader = self.controller.curation.session.user
        self.dataset_folder = self.controller.curation.folder
        self.times.dataset_s = time.perf_counter() - mark

        mark = time.perf_counter()
        self._init_state()
        self._build_ui()
        self._observe_slice_nodes()
        self.times.ui_s = time.perf_counter() - mark
        self.refresh()

    # ---- server wiring -------------------------------------------------------------------------

    def _on_server_bind(self, web_server) -> None:
        """Install the token guard on wslink's aiohttp application before it starts (its middlewares freeze then)."""
        web_server.app.middlewares.append(self.guard.middleware())

    def slice_views(self) -> list:
        return [self.slicer_app.view_manager.get_view(name) for name in VIEW_NAMES]

    def view_centres(self) -> dict[str, list[float]]:
        """RAS point at the centre of each slice view: column 3 of its slice node's SliceToRAS."""
        centres = {}
        for name, view in zip(VIEW_NAMES, self.slice_views()):
            matrix = view.get_view_node().GetSliceToRAS()
            centres[name] = [round(matrix.GetElement(row, 3), 3) for row in range(3)]
        return centres

    def _observe_slice_nodes(self) -> None:
        import vtk

        for view in self.slice_views():
            view.get_view_node().AddObserver(vtk.vtkCommand.ModifiedEvent, lambda *_: self._publish_view_centres())
        self._publish_view_centres()

    def _publish_view_centres(self) -> None:
        centres = self.view_centres()
        if centres != self.state.view_centres:
            self.state.view_centres = centres

    # ---- state ---------------------------------------------------------------------------------

    def _init_state(self) -> None:
        state = self.state
        state.trame__title = PAGE_TITLE
        state.reader = self.reader
        state.dataset_name = self.controller.curation.dataset.name or self.dataset_folder.name
        state.cases = []
        state.case_id = None
        state.nodes = []
        state.selected = None
        state.suspects = []
        state.cam_opacity = 0.4
        state.exclude_reason = ""
        state.note_text = ""
        state.message = ""
        state.error = ""
        state.busy = ""
        state.model_text = ""
        state.view_centres = {}
        state.window_text = ""
        state.change("cam_opacity")(self._on_cam_opacity)

    def refresh(self) -> None:
        """Redraw the lists from the controller's state (after every action)."""
        controller = self.controller
        panel = controller.state()
        curation = controller.curation
        dataset = curation.dataset
        self.state.cases = [self._case_row(case) for case in dataset.cases]
        loaded = panel.loaded_case
        self.state.case_id = loaded
        suspects = self._suspect_rows(panel.suspects_table)
        self.state.suspects = suspects
        ranks = {(row["case_id"], row["label_value"]): row["rank"] for row in suspects}
        self.state.nodes = self._node_rows(loaded, ranks) if loaded is not None else []
        selected = panel.selected
        self.state.selected = selected[1] if selected is not None and selected[0] == loaded else None
        info = controller.selected_info()
        self.state.note_text = (info or {}).get("note", "") if self.state.selected is not None else ""
        self.state.busy = panel.busy
        self.state.model_text = panel.intended_use
        self.state.message = " ".join([*panel.messages, panel.curation_status]).strip()

    def _case_row(self, case) -> dict:
        return {"case_id": case.case_id, "patient_id": case.patient_id, "status": self._case_status(case),
                "nodes": len(self.controller.curation.dataset.nodes_of(case.case_id))}

    def _case_status(self, case) -> str:
        return self.controller.curation.session_or_fail().case_read_status(case.case_id, self.reader)

    def _node_rows(self, case_id: str, ranks: dict) -> list[dict]:
        """One row per node of the loaded case; `ranks`: (case_id, label_value) -> suspect rank."""
        curation = self.controller.curation
        session = curation.session_or_fail()
        cautions = self._node_warnings()
        rows = []
        for node in curation.dataset.nodes_of(case_id):
            info = curation.row_info(curation.row_of(case_id, node.label_value)) or {}
            probability = curation.probability(case_id, node.label_value)
            reads = session.reader_labels(case_id, node.label_value)
            mine = reads.pop(self.reader, None)
            rows.append({
                "label_value": int(node.label_value),
                "probability": "" if probability is None else f"{probability:.2f}",
                "colour": _css_colour(probability),
                "label": _label_text(info.get("metastatic", "")),
                "source": session.label_source(case_id, node.label_value),
                "my_read": "" if mine is None else _label_text(str(mine)),
                "other_reads": ", ".join(f"{name}: {_label_text(str(value))}" for name, value in sorted(reads.items())),
                "excluded": bool(info.get("excluded", 0)),
                "reason": info.get("reason", ""),
                "note": info.get("note", ""),
                "rank": ranks.get((case_id, int(node.label_value)), ""),
                "warnings": "; ".join(cautions.get(int(node.label_value), [])),
            })
        return rows

    def _node_warnings(self) -> dict[int, list[str]]:
        """label value -> the loaded case's reasons not to trust that node's probability (result.warnings)."""
        loaded = self.controller.curation.loaded
        result = loaded.outputs.result if loaded is not None and loaded.outputs is not None else None
        if result is None:
            return {}
        cautions: dict[int, list[str]] = {}
        for node, warnings in zip(result.nodes, getattr(result, "warnings", None) or []):
            texts = [warnings] if isinstance(warnings, str) else list(warnings or [])
            cautions.setdefault(int(node.label_value), []).extend(str(t) for t in texts)
        return cautions

    @staticmethod
    def _suspect_rows(table_node) -> list[dict]:
        if table_node is None:
            return []
        table = table_node.GetTable()
        names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
        rows = []
        for row in range(table.GetNumberOfRows()):
            values = {name: table.GetValue(row, c).ToString() for c, name in enumerate(names)}
            try:
                label_value = int(float(values.get("label_value", "")))
            except ValueError:
                continue
            rows.append({"row": row, "rank": values.get("rank", str(row + 1)), "case_id": values.get("case_id", ""),
                         "label_value": label_value, "given": _label_text(values.get("given_label", "")),
                         "suggested": _label_text(values.get("suggested_label", "")),
                         "since": values.get("since_ranked", "")})
        return rows

    # ---- actions (browser events) --------------------------------------------------------------

    def _act(self, action, *args):
        """Run one browser action; a user's error becomes the page's one-line error, never a traceback."""
        self.state.error = ""
        try:
            return action(*args)
        except InputError as error:
            self.state.error = str(error)
        finally:
            self.refresh()
        return None

    def open_case(self, case_id):
        return self._act(lambda: self._open_case(str(case_id)))

    def _open_case(self, case_id: str):
        self.controller.curation.dataset.case(case_id)  # only a case of the served dataset (InputError otherwise)
        self.controller.select(case_id, None)
        self.controller.load_selected_case()
        self._show_layers(fit=True)

    def select_node(self, label_value):
        return self._act(lambda: self._select_node(_whole_number(label_value, "node label value")))

    def _select_node(self, label_value: int):
        case_id = self.controller.state().loaded_case
        if case_id is None:
            raise InputError("Open a case from the cases list first.")
        self.controller.select(case_id, label_value)
        self._centre_on(case_id, label_value)

    def select_suspect(self, row):
        return self._act(lambda: self._select_suspect(_whole_number(row, "suspect row")))

    def _select_suspect(self, row: int):
        self.controller.select_suspect(row)
        panel = self.controller.state()
        if panel.selected is None:
            return
        if panel.layers is not None:
            self._show_layers(fit=False)
        self._centre_on(*panel.selected)

    def step_node(self, step: int):
        rows = self.state.nodes or []
        if not rows:
            return None
        values = [row["label_value"] for row in rows]
        current = self.state.selected
        index = values.index(current) + step if current in values else (0 if step > 0 else len(values) - 1)
        return self.select_node(values[min(max(index, 0), len(values) - 1)])

    def read(self, metastatic: int):
        """This reader's read of the selected node (several readers' reads are kept; the label follows them)."""
        return self._act(lambda: self.controller.read(_whole_number(metastatic, "label")))

    def exclude(self):
        return self._act(self.controller.exclude_node, str(self.state.exclude_reason or ""))

    def include(self):
        return self._act(self.controller.include_node)

    def save_note(self):
        return self._act(self.controller.save_node_note, str(self.state.note_text or ""))

    def classify_case(self):
        def classify():
            if self.controller.state().loaded_case is None:
                raise InputError("Open a case from the cases list first.")
            selected = self.controller.state().selected
            self.controller.load_selected_case()
            self._show_layers(fit=False)
            if selected is not None and selected[1] is not None:
                self._centre_on(*selected)

        return self._act(classify)

    def on_key(self, action: str):
        if action == "next":
            return self.step_node(1)
        if action == "previous":
            return self.step_node(-1)
        if action == "metastatic":
            return self.read(1)
        if action == "benign":
            return self.read(0)
        if action == "exclude":
            return self.exclude()
        return None

    def _on_cam_opacity(self, cam_opacity, **_):
        self.controller.set_gradcam_opacity(float(cam_opacity))
        layers = self.controller.state().layers
        for view in self.slice_views():
            view.set_foreground_opacity(layers.foreground_opacity if layers is not None and layers.foreground is not None else 0.0)

    # ---- views ---------------------------------------------------------------------------------

    def _show_layers(self, fit: bool) -> None:
        """Put the controller's layers (CT, Grad-CAM, label map when not classified) in the three views."""
        layers = self.controller.state().layers
        if layers is None:
            return
        self._show_model_window(layers.background)
        app_logic = self.slicer_app.app_logic
        for view in self.slice_views():
            view.set_background_volume_id(layers.background.GetID() if layers.background is not None else None)
            view.set_foreground_volume_id(layers.foreground.GetID() if layers.foreground is not None else None)
            view.set_foreground_opacity(float(layers.foreground_opacity) if layers.foreground is not None else 0.0)
            composite = app_logic.GetSliceLogic(view.get_view_node()).GetSliceCompositeNode()
            composite.SetLabelVolumeID(layers.label.GetID() if layers.label is not None else None)
            if fit:
                view.fit_view_to_content()
        self._outline_segments()

    def _show_model_window(self, ct_node) -> None:
        """The CT at the window the model classified it at (its card's), when the case was classified."""
        from LymphNodeClassifierLib.pipeline import window_from_card

        from .logic import show_ct_window

        loaded = self.controller.curation.loaded
        if ct_node is None or loaded is None or loaded.outputs is None:
            return
        model = self.controller.classification.load_model(self.controller.resolved_model_path(), self.controller.curation.device)
        low, high = window_from_card(model.card)
        show_ct_window(ct_node, (low, high))
        self.state.window_text = f"CT window {low:g} to {high:g} HU (the model's)"

    def _outline_segments(self) -> None:
        """Node outlines only (no fill), so the CT under a node stays readable; Grad-CAM below the
        report's display threshold transparent (as in report.png's tiles: the faint rest of each
        node's map would otherwise tint whole boxes of the CT)."""
        from LymphNodeClassifierLib.report import CAM_DISPLAY_THRESHOLD

        loaded = self.controller.curation.loaded
        outputs = loaded.outputs if loaded is not None else None
        if outputs is None or outputs.segmentation_node is None:
            return
        if outputs.gradcam_node is not None and outputs.gradcam_node.GetDisplayNode() is not None:
            outputs.gradcam_node.GetDisplayNode().SetLowerThreshold(CAM_DISPLAY_THRESHOLD)
        display = outputs.segmentation_node.GetDisplayNode()
        if display is not None:
            display.SetVisibility2DFill(False)
            display.SetVisibility2DOutline(True)
            display.SetOpacity2DOutline(1.0)
            display.SetSliceIntersectionThickness(2)

    def _centre_on(self, case_id: str, label_value: int) -> None:
        point = self.controller.curation.node_centroid_ras(case_id, label_value)
        if point is None:
            raise InputError(f"Node {label_value} of case '{case_id}' is not in its label map; check the mask or exclude the node.")
        field_of_view = NODE_FIELD_OF_VIEW_MM
        loaded = self.controller.curation.loaded
        if loaded is not None and loaded.outputs is not None:
            sizes = [n.long_axis_mm for n in loaded.outputs.nodes if int(n.label_value) == int(label_value)]
            if sizes:
                field_of_view = max(field_of_view, NODE_FIELD_OF_VIEW_FACTOR * max(sizes))
        for view in self.slice_views():
            slice_node = view.get_view_node()
            with view.trigger_modified_once():
                slice_node.JumpSliceByCentering(*point)
                width, height, thickness = slice_node.GetFieldOfView()
                aspect = height / width if width > 0 else 1.0
                if aspect >= 1.0:
                    slice_node.SetFieldOfView(field_of_view, field_of_view * aspect, thickness)
                else:
                    slice_node.SetFieldOfView(field_of_view / aspect, field_of_view, thickness)
        self._publish_view_centres()

    # ---- page ----------------------------------------------------------------------------------

    def _build_ui(self) -> None:
        from trame.ui.vuetify3 import VAppLayout
        from trame.widgets import client, html
        from trame.widgets import vuetify3 as v

        self.server.trigger("review_key")(self.on_key)
        self.server.trigger("open_case")(self.open_case)
        self.server.trigger("select_node")(self.select_node)
        self.server.trigger("select_suspect")(self.select_suspect)

        with VAppLayout(self.server, full_height=True) as layout:
            layout.root.theme = "dark"
            client.Style(_PAGE_CSS)
            client.Script(KEYBOARD_SCRIPT % _json(KEY_ACTIONS))
            with v.VAppBar(density="compact", color="#263238"):
                v.VAppBarTitle("{{ dataset_name }} — lymph node review")
                html.Span("reader: {{ reader }}", classes="mr-4", id="lnc-reader")
            with v.VNavigationDrawer(permanent=True, width=300):
                html.Div("Cases", classes="text-subtitle-2 pa-2")
                with html.Table(classes="lnc-table", id="lnc-cases"):
                    with html.Tr(v_for="c in cases", key="c.case_id", classes=("{'lnc-selected': c.case_id === case_id}",),
                                 click="trigger('open_case', [c.case_id])",
                                 __properties=[("data_case", "data-case")], data_case=("c.case_id",)):
                        html.Td("{{ c.case_id }}")
                        html.Td("{{ c.nodes }} nodes")
                        html.Td("{{ c.status }}", classes=("'lnc-status lnc-' + c.status.replaceAll(' ', '-')",))
                html.Div("Suspect labels", classes="text-subtitle-2 pa-2", v_if="suspects.length")
                with html.Table(classes="lnc-table", id="lnc-suspects", v_if="suspects.length"):
                    with html.Tr(v_for="s in suspects", key="s.row", click="trigger('select_suspect', [s.row])",
                                 __properties=[("data_suspect", "data-suspect")], data_suspect=("s.row",)):
                        html.Td("#{{ s.rank }}")
                        html.Td("{{ s.case_id }} node {{ s.label_value }}")
                        html.Td("{{ s.given }} → {{ s.suggested }}")
                        html.Td("{{ s.since }}")
            with v.VMain():
                with html.Div(classes="lnc-main"):
                    with html.Div(classes="lnc-views", id="lnc-views"):
                        self.layout_manager.initialize_layout_grid(layout)
                    with html.Div(classes="lnc-controls"):
                        with html.Div(classes="d-flex align-center flex-wrap ga-2"):
                            v.VBtn("Metastatic (m)", color="red-darken-2", id="lnc-metastatic", click=(self.read, "[1]"),
                                   disabled=("selected === null || !!busy",))
                            v.VBtn("Benign (b)", color="green-darken-2", id="lnc-benign", click=(self.read, "[0]"),
                                   disabled=("selected === null || !!busy",))
                            v.VTextField(v_model=("exclude_reason",), label="Exclude reason", density="compact", hide_details=True,
                                         style="min-width: 180px; max-width: 220px", id="lnc-reason")
                            v.VBtn("Exclude (x)", id="lnc-exclude", click=self.exclude, disabled=("selected === null || !!busy",))
                            v.VBtn("Include", id="lnc-include", click=self.include, disabled=("selected === null || !!busy",))
                            v.VTextField(v_model=("note_text",), label="Note", density="compact", hide_details=True,
                                         style="min-width: 180px; max-width: 260px", id="lnc-note")
                            v.VBtn("Save note", id="lnc-save-note", click=self.save_note, disabled=("selected === null || !!busy",))
                            v.VBtn("Next node (n)", id="lnc-next", click=(self.step_node, "[1]"), disabled=("!nodes.length",))
                            v.VBtn("Classify this case", id="lnc-classify", color="primary", click=self.classify_case,
                                   disabled=("case_id === null || !!busy",))
                            html.Span("{{ window_text }}", classes="ml-2 text-caption", id="lnc-window")
                            html.Span("Grad-CAM", classes="ml-2")
                            v.VSlider(v_model=("cam_opacity",), min=0.0, max=1.0, step=0.05, hide_details=True,
                                      style="max-width: 160px", id="lnc-cam-opacity")
                        html.Div("{{ error }}", classes="lnc-error", id="lnc-error", v_if="error")
                        html.Div("{{ busy ? busy + '...' : message }}", classes="lnc-message", id="lnc-message")
                        with html.Table(classes="lnc-table lnc-nodes", id="lnc-nodes"):
                            with html.Tr():
                                for title in ("node", "probability", "label", "decided by", "my read", "other readers",
                                              "suspect rank", "excluded", "note", "caution"):
                                    html.Th(title)
                            with html.Tr(v_for="n in nodes", key="n.label_value",
                                         classes=("{'lnc-selected': n.label_value === selected, 'lnc-excluded': n.excluded}",),
                                         click="trigger('select_node', [n.label_value])",
                                         __properties=[("data_node", "data-node")], data_node=("n.label_value",)):
                                html.Td("{{ n.label_value }}")
                                with html.Td():
                                    html.Span("", classes="lnc-swatch", style=("{background: n.colour}",))
                                    html.Span("{{ n.probability }}", classes="lnc-probability")
                                html.Td("{{ n.label }}", classes="lnc-label")
                                html.Td("{{ n.source }}", classes="lnc-source")
                                html.Td("{{ n.my_read }}", classes="lnc-my-read")
                                html.Td("{{ n.other_reads }}", classes="lnc-other-reads")
                                html.Td("{{ n.rank }}")
                                html.Td("{{ n.excluded ? n.reason : '' }}")
                                html.Td("{{ n.note }}")
                                html.Td("{{ n.warnings }}", classes="lnc-warning")
                        html.Div("{{ model_text }}", classes="lnc-model text-caption")
        self.layout = layout

    # ---- running -------------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 8080, open_browser: bool = False, **kwargs):
        return self.server.start(host=host, port=port, open_browser=False, show_connection_info=False, timeout=0, **kwargs)


def _json(value) -> str:
    import json

    return json.dumps(value)


_PAGE_CSS = """
html { overflow-y: auto; }
.lnc-main { display: flex; flex-direction: column; height: calc(100vh - 48px); }
.lnc-views { display: flex; flex: 0 0 55vh; min-height: 260px; }
.lnc-controls { flex: 1 1 auto; overflow: auto; padding: 8px; }
.lnc-table { border-collapse: collapse; width: 100%; font-size: 13px; }
.lnc-table td, .lnc-table th { padding: 2px 6px; border-bottom: 1px solid #444; text-align: left; cursor: pointer; }
.lnc-selected { background: #1e3a5f; }
.lnc-excluded { opacity: 0.5; }
.lnc-swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin-right: 6px; vertical-align: middle; }
.lnc-error { color: #ff8a80; padding: 4px 0; }
.lnc-warning { color: #ffd180; }
.lnc-message { color: #b0bec5; padding: 4px 0; min-height: 1.5em; }
.lnc-status { font-size: 11px; }
.lnc-read-by-me { color: #69f0ae; }
.lnc-read-by-others { color: #ffd740; }
.lnc-excluded.lnc-status, .lnc-status.lnc-excluded { color: #9e9e9e; }
"""


# ------------------------------------------------------------------------------------------------
# command line


def station_url(host: str, port: int, token: str | None) -> str:
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{shown}:{port}/" + (f"?token={quote(token)}" if token else "")


def main(argv: Sequence[str] | None = None) -> int:
    """`review --dataset D [--port 8080] [--reader NAME] [--host 127.0.0.1] [--token T] [--open]`."""
    parser = OneLineArgumentParser(prog="python -m LymphNodeClassifierLib review", description="Serve a dataset to a browser for reading: real Slicer slice views, "
                                   "the model's probabilities, journalled relabelling by a named reader.")
    parser.add_argument("--dataset", required=True, help="dataset folder (with dataset.json)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080; 0 = any free port)")
    parser.add_argument("--reader", help="the reader's name on every edit (default: the login name)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs --token)")
    parser.add_argument("--token", help="access token every request must carry (required for a non-loopback --host)")
    parser.add_argument("--open", action="store_true", help="open the page in the default browser")
    parser.add_argument("--models", help="model folder (default: the user's model folder; its active model classifies)")
    args = parser.parse_args(argv)
    check_listen_address(args.host, args.token)
    if not 0 <= args.port <= 65535:
        raise InputError(f"The port {args.port} is not between 0 and 65535; choose a free port, e.g. 8080.")
    _check_port_free(args.host, args.port)
    started = time.perf_counter()
    _check_dataset(args.dataset, args.reader)
    station = ReviewStation(args.dataset, reader=args.reader, token=args.token, models_folder=args.models)

    def announce(**_):
        port = station.server.port
        url = station_url(args.host, port, args.token)
        times = station.times
        print(f"review station for {station.dataset_folder} (reader {station.reader}) at {url} "
              f"(ready in {time.perf_counter() - started:.1f} s: Slicer views {times.slicer_app_s:.1f} s, "
              f"dataset and model code {times.dataset_s:.1f} s)", flush=True)
        if args.open:
            webbrowser.open(url)

    station.server.controller.on_server_ready.add(announce)
    try:
        station.start(host=args.host, port=args.port)
    finally:
        station.controller.cleanup()
    return 0


def _check_dataset(folder: str, reader: str | None) -> None:
    """Fail in one line, before the seconds of starting Slicer, on what would stop the station later:
    no dataset there, an unreadable dataset.json, a dataset another session is curating, a bad name."""
    from LymphNodeClassifierLib.curation import CurationSession

    CurationSession(folder, user=reader).close()


def _check_port_free(host: str, port: int) -> None:
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as error:
            raise InputError(f"Cannot listen on {host}:{port} ({error.strerror}); choose another --port or --host.") from None


if __name__ == "__main__":
    from LymphNodeClassifierLib.cli import exit_code

    raise SystemExit(exit_code(lambda: main(sys.argv[1:])))
