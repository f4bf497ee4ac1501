"""Training in a background process, its live curves and its results, as MRML nodes (no Qt).

- `TrainingProcess(dataset, out_folder, options, python=sys.executable)`: runs
  `python -m LymphNodeClassifierLib.train_worker` (see that module for the events) with the
  module folder on PYTHONPATH. `start()`; `poll()` returns the events that arrived since the last
  call without blocking (a reader thread turns stdout lines into dicts; call `poll` from a QTimer);
  `cancel()` asks the whole worker tree to stop, waits, and kills the tree after a timeout
  (`cancel(wait=False)` returns at once and `poll` kills it when the timeout has passed);
  `is_running`, `returncode`. When the process ends without a final event (killed, crashed), `poll`
  adds one: `cancelled` after a cancel (saying so if the model had already been installed), else
  `error` with the last line of its stderr. `stop_all_workers()` stops every worker still running
  (module close).

  The worker tree. Inside Slicer `sys.executable` is PythonSlicer, a CTK launcher
  (commontk/AppLauncher, `ctkAppLauncherPrivate::runProcess`) that starts `python-real` as a
  QProcess child, installs no SIGTERM handler and forwards no signal: a SIGTERM sent to its pid
  kills the launcher and leaves `python-real` training. So on POSIX the worker is started in a new
  session (`start_new_session`: the launcher leads a new process group, and `python-real` and any
  helper it starts inherit that group); the polite stop is SIGTERM to the whole group (`os.killpg`)
  plus a "cancel" line on the worker's stdin, the kill after the grace period is SIGKILL to the
  group, and the run counts as ended only when no live process of the group is left, even when the
  launcher exited first (the group id is the launcher's pid, kept from the start). On Windows
  (guarded code, not run here): CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW and a hidden-window
  STARTUPINFO, as Slicer's `slicer.util.launchConsoleProcess` does; the polite stop is the stdin
  line (a console-less GUI such as Slicer cannot deliver CTRL_BREAK_EVENT, which is still sent in
  case it can), the kill `taskkill /T /F` on the launcher's and the worker's own pid (the pid that
  the worker reports in its `started` event).
- `TrainingCurves(scene)`: a vtkMRMLTableNode (epoch, train_loss, val_loss, val_auc), three
  vtkMRMLPlotSeriesNodes and a vtkMRMLPlotChartNode for the live loss / AUC curves in a plot view.
- `results_table(done_event)`: a vtkMRMLTableNode comparing the new model, the active model and
  the short-axis size rule on the same test nodes (ACC, AUC, sensitivity, specificity, PPV, NPV
  with their 95 % CIs, each one's confusion matrix as TP / FN / FP / TN, its calibration -- Brier
  score and expected calibration error with 95 % CIs -- and how its decision threshold was chosen);
  `roc_chart(done_event)`: their ROC curves on those nodes as a vtkMRMLPlotChartNode;
  `reliability_chart(done_event)`: their reliability diagrams (fraction metastatic against mean
  predicted probability per bin, and the diagonal of perfect calibration), another plot chart.
- `TrainingRun`: the three together, so the Widget only calls `start`, `step` (from its timer),
  `cancel` and reads `progress`, `status`, `outcome`, `message`, `model_path`, `results_node`,
  `roc_chart_node`, `reliability_chart_node`.
- `scenario_training_process()`: a tiny complete run (phantom cohort, two epochs) for "Reload and
  Test" and the headless tests.
"""

from __future__ import annotations

import json
import math
import os
import queue
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import slicer
import vtk

from LymphNodeClassifierLib.train_worker import STDIN_CANCEL_ENV, STDIN_CANCEL_LINE, TERMINAL_EVENTS, options_to_argv

MODULE_DIR = Path(__file__).resolve().parents[1]
WORKER_MODULE = "LymphNodeClassifierLib.train_worker"
SUSPECTS_WORKER_MODULE = "LymphNodeClassifierLib.suspects_worker"
CURVE_COLUMNS = ("epoch", "train_loss", "val_loss", "val_auc")
RESULT_METRICS = (("ACC", "accuracy"), ("AUC", "auc"), ("Sensitivity", "sensitivity"), ("Specificity", "specificity"),
                  ("PPV", "ppv"), ("NPV", "npv"))
RESULT_COLUMNS = ("metric", "new model", "active model", "size rule")
CONFUSION_ROW = "TP / FN / FP / TN"  # the confusion matrix of each column at its operating point
CALIBRATION_METRICS = (("Brier score", "brier"), ("ECE", "ece"))  # from each block's `calibration`
THRESHOLD_ROW = "decision threshold rule"
ROC_SERIES = (("new model", "new_model", (0.84, 0.15, 0.16)), ("active model", "active_model", (0.5, 0.5, 0.5)),
              ("size rule", "size_rule", (0.12, 0.47, 0.71)))
# The tiny run of the self-test: 32 px patches at 1.58 mm (same field of view as 64 px at 0.79 mm),
# and fractions that a cohort of five patients can be split into.
TINY_OPTIONS = {
    "epochs": 2, "batch_size": 16, "patch_size": 32, "spacing_mm": (1.58, 1.58, 1.58),
    "split_fractions": (0.5, 0.25, 0.25), "patience": 5, "bootstrap": 100, "num_threads": 1,
}
TINY_COHORT = {"cases": 8, "seed": 3}


KILL_WAIT_SECONDS = 10.0  # how long a killed tree may take to disappear (a process in uninterruptible I/O)
_live_processes: "weakref.WeakSet[TrainingProcess]" = weakref.WeakSet()  # for stop_all_workers (module close)


def new_job_id() -> str:
    return f"train-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def default_scene():
    scene = getattr(slicer, "mrmlScene", None)
    if scene is None:
        raise ValueError("no MRML scene: pass one (slicer.vtkMRMLScene() outside the Slicer application)")
    return scene


# --------------------------------------------------------------------------------------------
# the process


class TrainingProcess:
    """One training job in a child process; events are read from its stdout without blocking."""

    cancelled_message = "Training was stopped; no model was written."
    crashed_message = "The training process ended unexpectedly ({detail})."

    def __init__(self, dataset: str | os.PathLike, out_folder: str | os.PathLike, options: Mapping[str, Any] | None = None,
                 python: str | None = sys.executable, job_id: str | None = None) -> None:
        # absolute: the worker runs with the module folder as its working directory
        self.dataset = Path(dataset).resolve()
        self.out_folder = Path(out_folder).resolve()
        self.options = dict(options or {})
        self.python = python or sys.executable
        self.job_id = job_id or new_job_id()
        self.events: list[dict] = []
        self.final_event: dict | None = None
        self._process: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._reader: threading.Thread | None = None
        self._stderr = None
        self._cancel_requested = False
        self._kill_deadline: float | None = None
        self._finished = False
        self._group: int | None = None  # POSIX: the process group of the whole tree (= the launched program's pid)
        self.worker_pid: int | None = None  # the interpreter that runs the worker (python-real under PythonSlicer)

    def command(self) -> list[str]:
        return [self.python, "-m", WORKER_MODULE, "--dataset", str(self.dataset), "--out-folder", str(self.out_folder),
                "--job-id", self.job_id, *options_to_argv(self.options)]

    def start(self) -> None:
        if self._process is not None:
            raise RuntimeError("this training process was already started; create a new TrainingProcess")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["PYTHONIOENCODING"] = "utf-8"
        env[STDIN_CANCEL_ENV] = "1"  # the worker stops on a "cancel" line (or end) of its stdin
        self._stderr = tempfile.TemporaryFile()
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            # a group of its own (CTRL_BREAK reaches only the worker) and no console window, hidden as
            # slicer.util.launchConsoleProcess hides it (STARTF_USESHOWWINDOW with SW_HIDE)
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)
            startupinfo = subprocess.STARTUPINFO()
            startupinfo.dwFlags |= subprocess.STARTF_USESHOWWINDOW
            startupinfo.wShowWindow = 0
            kwargs["startupinfo"] = startupinfo
        else:
            kwargs["start_new_session"] = True  # a new process group: launcher, python-real and helpers share it
        self._process = subprocess.Popen(
            self.command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=env,
            cwd=str(MODULE_DIR), **kwargs,
        )
        if os.name != "nt":
            self._group = self._process.pid  # setsid() made the launched program the group's leader
        _live_processes.add(self)
        self._reader = threading.Thread(target=self._read_stdout, name=f"{self.job_id} events", daemon=True)
        self._reader.start()

    def _read_stdout(self) -> None:
        stream = self._process.stdout
        try:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").strip()
                if not line:
                    continue
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    event = None
                if not isinstance(event, dict) or "event" not in event:
                    event = {"event": "log", "message": line}
                elif event["event"] == "started" and isinstance(event.get("pid"), int) and self.worker_pid is None:
                    self.worker_pid = event["pid"]
                self._queue.put(event)
        finally:
            stream.close()

    @property
    def started(self) -> bool:
        return self._process is not None

    @property
    def is_running(self) -> bool:
        """Some process of the worker tree is alive (the launched program or, after it, its children)."""
        return self._process is not None and (self._process.poll() is None or self._tree_alive())

    def _tree_alive(self) -> bool:
        """Whether a live (not zombie) process of the worker tree is left, besides the launched program."""
        if self._group is not None:
            return _group_alive(self._group)
        if os.name == "nt" and self.worker_pid is not None:
            return _windows_pid_alive(self.worker_pid)
        return False

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.poll()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    def poll(self) -> list[dict]:
        """The events that arrived since the last call (never blocks for long)."""
        if self._process is None or self._finished:
            return []
        events = self._drain()
        running = self.is_running
        if running and self._kill_deadline is not None and time.monotonic() >= self._kill_deadline:
            self._kill()
            running = self.is_running
        returncode = self._process.poll()
        if not running:
            self._reader.join(timeout=2.0)  # stdout closes with the process (unless a stray helper holds it)
            events += self._drain()
            self._finished = True
            if self.final_event is None and not any(e.get("event") in TERMINAL_EVENTS for e in events):
                events.append(self._exit_event(returncode))
        for event in events:
            self.events.append(event)
            if event.get("event") in TERMINAL_EVENTS and self.final_event is None:
                self.final_event = event
        if self._finished:
            _live_processes.discard(self)
            try:
                self._process.stdin.close()
            except (OSError, ValueError):
                pass
            self._remove_leftovers()
            if self._stderr is not None:
                self._stderr_tail_cache = self.stderr_tail()
                self._stderr.close()
                self._stderr = None
        return events

    def _drain(self) -> list[dict]:
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def _installed_output(self) -> Path | None:
        """What the job wrote into place although it was stopped (the model, for training)."""
        from LymphNodeClassifierLib.model_registry import MODEL_SUFFIX, safe_name

        path = self.out_folder / f"{safe_name(self.job_id)}{MODEL_SUFFIX}"
        return path if path.is_file() else None

    def _exit_event(self, returncode: int) -> dict:
        if self._cancel_requested:
            installed = self._installed_output()
            if installed is not None:  # stopped after the install, before it could say so: say what is there
                return {"event": "cancelled", "synthesized": True, "model_path": str(installed),
                        "message": f"The run was stopped after its model was written ({installed.name}); its results were not reported."}
            return {"event": "cancelled", "message": self.cancelled_message, "synthesized": True}
        tail = [line for line in self.stderr_tail().splitlines() if line.strip()]
        detail = tail[-1].strip() if tail else f"exit code {returncode}"
        return {"event": "error", "message": self.crashed_message.format(detail=detail), "synthesized": True}

    def stderr_tail(self, max_bytes: int = 4000) -> str:
        """The end of what the process wrote to stderr (warnings, tracebacks)."""
        if self._stderr is None:
            return getattr(self, "_stderr_tail_cache", "")
        try:
            self._stderr.flush()
            size = self._stderr.seek(0, os.SEEK_END)
            self._stderr.seek(max(0, size - max_bytes))
            return self._stderr.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""

    def cancel(self, wait: bool = True, timeout: float = 10.0) -> None:
        """Ask the whole worker tree to stop; kill the tree if any of it still runs after `timeout` seconds.

        With `wait=True` this returns once no process of the tree is left. With `wait=False` it
        returns at once and `poll()` kills the tree once the timeout passed.
        """
        if not self.is_running:
            return
        first = not self._cancel_requested
        self._cancel_requested = True
        if first:
            self._request_stop()
            self._kill_deadline = time.monotonic() + max(0.0, float(timeout))
        if wait:
            while self.is_running and time.monotonic() < self._kill_deadline:
                time.sleep(0.05)
            if self.is_running:
                self._kill()

    def _request_stop(self) -> None:
        """The polite stop: a "cancel" line on the worker's stdin, and SIGTERM (CTRL_BREAK) to its group."""
        try:
            self._process.stdin.write(STDIN_CANCEL_LINE.encode("ascii") + b"\n")
            self._process.stdin.close()  # the end of stdin means the same to the worker
        except (OSError, ValueError):  # it ended meanwhile
            pass
        try:
            if self._group is not None:
                os.killpg(self._group, signal.SIGTERM)  # the launcher forwards nothing: signal python-real itself
            elif os.name == "nt":
                os.kill(self._process.pid, signal.CTRL_BREAK_EVENT)  # its group; fails without a shared console
        except OSError:
            pass

    def _kill(self) -> None:
        """SIGKILL the whole tree (taskkill /T /F on Windows) and wait until it is gone."""
        if self._group is not None:
            try:
                os.killpg(self._group, signal.SIGKILL)
            except OSError:  # nothing of the group is left
                pass
        elif os.name == "nt":
            for pid in {self._process.pid, self.worker_pid} - {None}:  # python-real may have outlived the launcher
                subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0), check=False)
        else:
            self._process.kill()
        deadline = time.monotonic() + KILL_WAIT_SECONDS
        while self.is_running and time.monotonic() < deadline:
            time.sleep(0.02)

    def _remove_leftovers(self) -> None:
        """A killed worker may leave its hidden temporary files; nothing visible is touched."""
        if self.final_event is not None and self.final_event.get("event") == "done":
            return
        try:
            names = os.listdir(self.out_folder)
        except OSError:
            return
        for name in names:
            if name.startswith(".") and self.job_id in name and (".partial" in name or name.endswith(".installing")):
                try:
                    (self.out_folder / name).unlink()
                except OSError:
                    pass

    def wait(self, timeout: float | None = None, interval: float = 0.1, on_events=None) -> list[dict]:
        """Poll until the process has ended (or `timeout` seconds passed); returns every event so far."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._finished:
            events = self.poll()
            if on_events is not None and events:
                on_events(events)
            if self._finished or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(interval)
        return list(self.events)

    @property
    def finished(self) -> bool:
        """True once the process ended and its final event was returned by `poll`."""
        return self._finished


def _group_alive(group: int) -> bool:
    """Whether a live process is left in the POSIX process group `group`.

    Zombies do not count: an orphaned python-real that exited stays a zombie until its new parent
    (init, or a container's first process that may never do it) reaps it.
    """
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # ended meanwhile, or not ours to read
                continue
            fields = stat[stat.rfind(")") + 2:].split()  # after "pid (command) ": state, ppid, pgrp, ...
            if len(fields) > 2 and fields[2] == str(group) and fields[0] not in ("Z", "X"):
                return True
        return False
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of the group exists (not ours to signal)
        return True
    return True


def _windows_pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs (Windows; os.kill would terminate it, so ask the kernel)."""
    import ctypes

    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(0x1000, False, int(pid))  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return False
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def stop_all_workers(timeout: float = 5.0) -> list[TrainingProcess]:
    """Stop every training / suspect worker this Slicer session still runs (module close, scene close).

    Asks them all to stop at once, waits up to `timeout` seconds, then kills whatever is left of
    their trees; returns once none of their processes is alive. Returns the processes it stopped.
    """
    running = [process for process in list(_live_processes) if process.is_running]
    for process in running:
        process.cancel(wait=False, timeout=timeout)
    for process in running:
        process.cancel(wait=True)  # waits out the same deadline, then kills the tree
        process.poll()  # collects the final event and closes the files
    return running


class SuspectsProcess(TrainingProcess):
    """The suspect-label search (`LymphNodeClassifierLib.suspects_worker`) of a dataset folder in a child process.

    Same start / poll / cancel as training; the list is written into the dataset folder.
    """

    cancelled_message = "The suspect search was stopped; the previous list (if any) is unchanged."
    crashed_message = "The suspect search ended unexpectedly ({detail})."

    def __init__(self, dataset: str | os.PathLike, folds: int = 5, seed: int = 0, python: str | None = sys.executable) -> None:
        super().__init__(dataset, dataset, {}, python=python, job_id=f"suspects-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
        self.folds, self.seed = int(folds), int(seed)

    def _installed_output(self) -> Path | None:
        return None  # the list is written atomically; a stopped search reports the previous list as kept

    def command(self) -> list[str]:
        return [self.python, "-m", SUSPECTS_WORKER_MODULE, "--dataset", str(self.dataset), "--folds", str(self.folds), "--seed", str(self.seed)]

    def status(self) -> str:
        """One line for the panel: what the search is doing or how it ended."""
        if self.final_event is not None:
            event = self.final_event
            if event["event"] == "done":
                return f"{event['n']} labelled nodes ranked in {event['seconds']:.0f} s; {event['n_issues']} flagged for review."
            return str(event.get("message", event["event"]))
        progress = [e for e in self.events if e.get("event") == "progress"]
        if self.cancel_requested:
            return "Stopping the suspect search..."
        if progress:
            last = progress[-1]
            what = "Reading patches" if last["stage"] == "patches" else "Measuring nodes"
            return f"{what}: case {last['done']} of {last['total']}..."
        return "Starting the suspect search..."


# --------------------------------------------------------------------------------------------
# curves


class TrainingCurves:
    """Loss and validation-AUC curves: a table node, plot series nodes and a chart node."""

    SERIES = (  # (name, y column, colour, line style)
        ("train loss", "train_loss", (0.12, 0.47, 0.71), "solid"),
        ("val loss", "val_loss", (0.84, 0.15, 0.16), "solid"),
        ("val AUC", "val_auc", (0.17, 0.63, 0.17), "dash"),
    )

    def __init__(self, scene=None, name: str = "Training curves") -> None:
        self.scene = scene or default_scene()
        self.name = name
        self.table_node = self.scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} table")
        self.series_nodes = []
        self.chart_node = self.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} chart")
        self._new_table()
        for label, column, colour, style in self.SERIES:
            series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} {label}")
            series.SetAndObserveTableNodeID(self.table_node.GetID())
            series.SetXColumnName("epoch")
            series.SetYColumnName(column)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)  # x from the epoch column
            series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
            series.SetMarkerSize(5)
            series.SetLineStyle(series.GetLineStyleFromString(style))
            series.SetColor(*colour)
            series.SetName(label)
            self.chart_node.AddAndObservePlotSeriesNodeID(series.GetID())
            self.series_nodes.append(series)
        self.chart_node.SetTitle("Training")
        self.chart_node.SetXAxisTitle("epoch")
        self.chart_node.SetYAxisTitle("loss / AUC")
        self.chart_node.SetLegendVisibility(True)

    def _new_table(self) -> None:
        table = vtk.vtkTable()
        for name in CURVE_COLUMNS:
            array = vtk.vtkIntArray() if name == "epoch" else vtk.vtkDoubleArray()
            array.SetName(name)
            table.AddColumn(array)
        self.table_node.SetAndObserveTable(table)
        self.table_node.SetLocked(True)

    def reset(self, title: str = "Training") -> None:
        """Empty the curves (a new run, or the next fold)."""
        self._new_table()
        self.chart_node.SetTitle(title)
        self.table_node.Modified()

    def add_epoch(self, epoch: int, train_loss, val_loss, val_auc) -> None:
        table = self.table_node.GetTable()
        values = {"epoch": int(epoch), "train_loss": _float(train_loss), "val_loss": _float(val_loss), "val_auc": _float(val_auc)}
        for name in CURVE_COLUMNS:
            table.GetColumnByName(name).InsertNextValue(values[name])
        table.Modified()
        self.table_node.Modified()

    def update(self, event: Mapping[str, Any]) -> bool:
        """Apply one worker event: `epoch` adds a row, a fold's `start` begins new curves.

        Returns True when the curves changed.
        """
        kind = event.get("event")
        if kind == "start" and event.get("fold"):
            self.reset(f"Training, {event.get('stage') or 'fold %s of %s' % (event['fold'], event.get('folds', '?'))}")
            return True
        if kind == "epoch":
            self.add_epoch(event.get("epoch", self.rows + 1), event.get("train_loss"), event.get("val_loss"), event.get("val_auc"))
            return True
        return False

    @property
    def rows(self) -> int:
        return int(self.table_node.GetTable().GetNumberOfRows())

    def column(self, name: str) -> list[float]:
        array = self.table_node.GetTable().GetColumnByName(name)
        return [array.GetValue(i) for i in range(array.GetNumberOfTuples())]

    def nodes(self) -> list:
        return [self.table_node, self.chart_node, *self.series_nodes]

    def remove(self) -> None:
        for node in self.nodes():
            if node.GetScene() is not None:
                self.scene.RemoveNode(node)


def _float(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number if math.isfinite(number) else math.nan


# --------------------------------------------------------------------------------------------
# results


def format_metric(block: Mapping[str, Any] | None, key: str) -> str:
    """'0.853 [0.712, 0.951]' (value and 95 % CI), 'n/a' when undefined."""
    if not block:
        return "n/a"
    value = block.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "n/a"
    ci = (block.get("ci95") or {}).get(key)
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci):
        return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return f"{value:.3f}"


def results_rows(done_event: Mapping[str, Any]) -> list[list[str]]:
    """The results table as rows of strings (RESULT_COLUMNS)."""
    comparison = dict(done_event.get("comparison") or {})
    new, active, size = comparison.get("new_model"), comparison.get("active_model"), comparison.get("size_rule")
    test_set = comparison.get("test_set") or {}
    if comparison.get("error"):
        return [["test set", comparison["error"], "", ""]]
    model_path = done_event.get("model_path")
    if active is None:
        active_name, active_block = "none", None
    elif active.get("error"):
        active_name, active_block = f"{Path(str(active.get('path', ''))).name}: {active['error']}", None
    else:
        active_name, active_block = active.get("name") or Path(str(active.get("path", ""))).name, active
    rows = [
        ["model", Path(model_path).name if model_path else "new model", active_name, (size or {}).get("rule", "short axis")],
        ["test nodes (metastatic)", f"{test_set.get('nodes', '?')} ({test_set.get('metastatic', '?')})",
         "" if active_block is None else f"{active_block.get('n', '?')} ({active_block.get('n_positive', '?')})",
         f"{(size or {}).get('n', '?')} ({(size or {}).get('n_positive', '?')})"],
    ]
    for label, key in RESULT_METRICS:
        rows.append([label, format_metric(new, key), format_metric(active_block, key), format_metric(size, key)])
    rows.append([CONFUSION_ROW, *(_confusion_text(block) for block in (new, active_block, size))])
    blocks = (new, active_block, size)
    for label, key in CALIBRATION_METRICS:
        rows.append([label, *(format_metric((block or {}).get("calibration"), key) for block in blocks)])
    rows.append([THRESHOLD_ROW, *(_threshold_text(block) for block in blocks)])
    return rows


def _threshold_text(block: Mapping[str, Any] | None) -> str:
    """How a column's decision threshold was chosen, with its value: 'youden: 0.412'."""
    if not block:
        return ""
    rule = str(block.get("threshold_rule") or "")
    threshold = block.get("threshold")
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and math.isfinite(threshold):
        return f"{rule}: {threshold:.3f}" if rule else f"{threshold:.3f}"
    return rule


def _confusion_text(block: Mapping[str, Any] | None) -> str:
    if not block or any(block.get(key) is None for key in ("tp", "fn", "fp", "tn")):
        return ""
    return f"{block['tp']} / {block['fn']} / {block['fp']} / {block['tn']}"


def _xy_chart(scene, name: str, curves: list[dict], title: str, x_title: str, y_title: str) -> list:
    """One plot chart of several x/y curves sharing one table ([chart, table, series...]).

    Each curve: label, x / y (values), x_name / y_name (its table columns), colour and optionally
    marker ("circle" or "none", default none) and line ("solid", "dash"). Shorter curves end in
    NaN rows, which the plot skips.
    """
    table = vtk.vtkTable()
    length = max(len(curve["x"]) for curve in curves)
    for curve in curves:
        for axis in ("x", "y"):
            array = vtk.vtkDoubleArray()
            array.SetName(curve[f"{axis}_name"])
            for value in list(curve[axis]) + [math.nan] * (length - len(curve[axis])):
                array.InsertNextValue(float(value))
            table.AddColumn(array)
    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} table")
    table_node.SetAndObserveTable(table)
    table_node.SetLocked(True)
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} chart")
    nodes = [chart, table_node]
    for curve in curves:
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} {curve['label']}")
        series.SetAndObserveTableNodeID(table_node.GetID())
        series.SetXColumnName(curve["x_name"])
        series.SetYColumnName(curve["y_name"])
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        circle = curve.get("marker") == "circle"
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle if circle else slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        series.SetLineStyle(series.GetLineStyleFromString(curve.get("line", "solid")))
        series.SetColor(*curve["colour"])
        series.SetName(curve["label"])
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
        nodes.append(series)
    chart.SetTitle(title)
    chart.SetXAxisTitle(x_title)
    chart.SetYAxisTitle(y_title)
    chart.SetLegendVisibility(True)
    return nodes


def _nodes_text(comparison: Mapping[str, Any]) -> str:
    """'test set (40 nodes)' or 'out of fold (56 nodes)': which nodes a chart shows."""
    test_set = comparison.get("test_set") or {}
    pooled = str(test_set.get("split", "")).startswith("out-of-fold")  # k-fold: every node, out of fold
    return f"{'out of fold' if pooled else 'test set'} ({test_set.get('nodes', '?')} nodes)"


def roc_chart(done_event: Mapping[str, Any], scene=None, name: str = "Training ROC") -> list:
    """The test-set ROC curves of the new model, the active model and the size rule as Slicer plot nodes.

    Returns [chart, table, series...] (empty when the comparison has no ROC, e.g. one class only);
    the chart is the first node. Each curve is scikit-learn's `roc_curve` from the worker's metrics.
    """
    scene = scene or default_scene()
    comparison = dict(done_event.get("comparison") or {})
    curves = [(label, (comparison.get(key) or {}).get("roc"), colour) for label, key, colour in ROC_SERIES]
    curves = [{"label": label, "x": roc["fpr"], "y": roc["tpr"], "x_name": f"{label} fpr", "y_name": f"{label} tpr", "colour": colour}
              for label, roc, colour in curves if roc and roc.get("fpr")]
    if not curves:
        return []
    return _xy_chart(scene, name, curves, f"ROC, {_nodes_text(comparison)}", "1 - specificity", "sensitivity")


def reliability_chart(done_event: Mapping[str, Any], scene=None, name: str = "Training reliability") -> list:
    """The reliability diagrams of the new model, the active model and the size rule as Slicer plot nodes.

    Returns [chart, table, series...] (empty without any calibration); the chart is the first node.
    One point per non-empty probability bin (`metrics.reliability_curve`: mean predicted
    probability, fraction metastatic), and a dashed diagonal of perfect calibration.
    """
    scene = scene or default_scene()
    comparison = dict(done_event.get("comparison") or {})
    curves = []
    for label, key, colour in ROC_SERIES:
        calibration = (comparison.get(key) or {}).get("calibration") or {}
        curve = calibration.get("reliability") or {}
        points = [(float(x), float(y)) for x, y, n in zip(curve.get("mean_predicted") or [], curve.get("fraction_positive") or [],
                                                          curve.get("counts") or []) if n and x is not None and y is not None]
        if points:
            curves.append({"label": f"{label} (ECE {_fmt(calibration.get('ece'))})", "x": [x for x, _ in points], "y": [y for _, y in points],
                           "x_name": f"{label} mean predicted", "y_name": f"{label} fraction metastatic", "colour": colour, "marker": "circle"})
    if not curves:
        return []
    curves.append({"label": "perfectly calibrated", "x": [0.0, 1.0], "y": [0.0, 1.0], "x_name": "diagonal x", "y_name": "diagonal y",
                   "colour": (0.6, 0.6, 0.6), "line": "dash"})
    return _xy_chart(scene, name, curves, f"Reliability, {_nodes_text(comparison)}", "mean predicted probability", "fraction metastatic")


def results_table(done_event: Mapping[str, Any], scene=None, table_node=None, name: str = "Training results"):
    """A table node comparing new model / active model / size rule on the test set (95 % CIs in brackets)."""
    scene = scene or (table_node.GetScene() if table_node is not None else default_scene())
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = vtk.vtkTable()
    arrays = []
    for column in RESULT_COLUMNS:
        array = vtk.vtkStringArray()
        array.SetName(column)
        table.AddColumn(array)
        arrays.append(array)
    for row in results_rows(done_event):
        for array, value in zip(arrays, row):
            array.InsertNextValue(str(value))
    table_node.SetAndObserveTable(table)
    table_node.SetUseColumnTitleAsColumnHeader(True)
    table_node.SetLocked(True)
    return table_node


def table_rows(table_node) -> list[list[str]]:
    """Every row of a table node as strings (for tests and reports)."""
    table = table_node.GetTable()
    return [[table.GetValue(r, c).ToString() for c in range(table.GetNumberOfColumns())] for r in range(table.GetNumberOfRows())]


# --------------------------------------------------------------------------------------------
# a run: process + curves + results


class TrainingRun:
    """What the Training tab shows of one job; `step()` is called from the Widget's timer."""

    def __init__(self, scene, dataset, out_folder, options: Mapping[str, Any] | None = None, python: str | None = None,
                 curves: TrainingCurves | None = None, job_id: str | None = None) -> None:
        self.scene = scene or default_scene()
        self.process = TrainingProcess(dataset, out_folder, options, python=python or sys.executable, job_id=job_id)
        self.curves = curves or TrainingCurves(self.scene)
        self.results_node = None
        self.roc_nodes: list = []  # [chart, table, series...] of the test-set ROC once done
        self.reliability_nodes: list = []  # [chart, table, series...] of the test-set reliability diagrams once done
        self.progress = 0.0
        self.status = ""
        self.outcome: str | None = None  # "done", "cancelled" or "error" once finished
        self.message = ""
        self.model_path: str | None = None
        self.done_event: dict | None = None
        self.folds = 0

    @property
    def roc_chart_node(self):
        """The test-set ROC chart once the run is done (None before, or without a ROC)."""
        return self.roc_nodes[0] if self.roc_nodes else None

    @property
    def reliability_chart_node(self):
        """The test-set reliability diagram chart once the run is done (None before, or without calibration)."""
        return self.reliability_nodes[0] if self.reliability_nodes else None

    @property
    def finished(self) -> bool:
        """The final event was applied and the process has exited."""
        return self.outcome is not None and self.process.finished

    def start(self) -> None:
        self.curves.reset()
        self.process.start()
        self.status = "Starting the training process..."

    def cancel(self, wait: bool = False, timeout: float = 10.0) -> None:
        if self.process.is_running:
            self.status = "Cancelling..."
            self.process.cancel(wait=wait, timeout=timeout)

    def step(self) -> list[dict]:
        events = self.process.poll()
        for event in events:
            self.apply(event)
        return events

    def wait(self, timeout: float | None = None, interval: float = 0.1) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished and (deadline is None or time.monotonic() < deadline):
            self.step()
            if not self.finished:
                _process_events()
                time.sleep(interval)

    def _set_progress(self, fraction: float) -> None:
        self.progress = max(self.progress, min(1.0, max(0.0, float(fraction))))

    def apply(self, event: Mapping[str, Any]) -> None:
        kind = event.get("event")
        self.curves.update(event)
        if kind == "started":
            self.status = "Loading PyTorch..."
        elif kind == "config":
            self.folds = int(event.get("folds") or 0)
        elif kind == "patches":
            total = max(1, int(event.get("total") or 1))
            self._set_progress(0.1 * int(event.get("done") or 0) / total)
            self.status = f"Extracting patches: case {event.get('done')} of {total}"
        elif kind == "data":
            self.status = (f"{event.get('nodes')} nodes ({event.get('metastatic')} metastatic) of "
                           f"{event.get('patients')} patients; training...")
        elif kind == "epoch":
            epochs = max(1, int(event.get("epochs") or 1))
            stages = self.folds + 1 if self.folds else 1  # k-fold: K folds, then the model on all nodes
            stage = min(stages, max(1, int(event.get("fold") or 1)))
            self._set_progress(0.1 + 0.85 * ((stage - 1) + int(event.get("epoch") or 0) / epochs) / stages)
            prefix = f"{str(event.get('stage') or '').capitalize()}, epoch" if event.get("stage") else "Epoch"
            self.status = (f"{prefix} {event.get('epoch')}/{epochs}: train loss {_fmt(event.get('train_loss'))}, "
                           f"val loss {_fmt(event.get('val_loss'))}, val AUC {_fmt(event.get('val_auc'))}")
        elif kind == "trained":
            self.status = f"Best epoch {event.get('best_epoch')} of {event.get('epochs_run')}; evaluating..."
        elif kind == "comparing":
            self._set_progress(0.95)
            self.status = "Comparing with the active model and the size rule on the test set..."
        elif kind == "done":
            self._set_progress(1.0)
            self.outcome, self.done_event = "done", dict(event)
            self.model_path = event.get("model_path")
            self.results_node = results_table(event, self.scene, self.results_node)
            self.roc_nodes = roc_chart(event, self.scene)
            self.reliability_nodes = reliability_chart(event, self.scene)
            self.message = f"Model written to {self.model_path}."
            self.status = "Finished. " + self.message
        elif kind == "cancelled":
            self.outcome = "cancelled"
            self.model_path = event.get("model_path")  # set only when the model was written before the stop
            self.message = str(event.get("message") or "Training cancelled; no model was written.")
            self.status = self.message
        elif kind == "error":
            self.outcome = "error"
            self.message = str(event.get("message") or "Training failed.")
            self.status = "Failed: " + self.message


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{float(value):.3f}"


def _process_events() -> None:
    """Keep Slicer's GUI responsive while a scenario waits (no-op headless)."""
    app = getattr(slicer, "app", None)
    if app is not None and hasattr(app, "processEvents"):
        app.processEvents()


# --------------------------------------------------------------------------------------------
# scenario for "Reload and Test" and the tests


def make_tiny_cohort(folder: str | os.PathLike, cases: int = TINY_COHORT["cases"], seed: int = TINY_COHORT["seed"]) -> Path:
    """A phantom cohort small enough to train on in seconds (8 cases of 5 patients, ~56 nodes)."""
    from LymphNodeClassifierLib.phantoms import generate_cohort

    generate_cohort(folder, cases=cases, seed=seed)
    return Path(folder)


def scenario_training_process(scene=None, work_dir: str | os.PathLike | None = None, python: str | None = None,
                              timeout: float = 300.0, options: Mapping[str, Any] | None = None) -> dict:
    """A tiny run end to end: curves fill up, a model lands in the folder, its card loads, make-active works.

    `options` replace the tiny run's options (TINY_OPTIONS), e.g. `{"folds": 2, "inner_val_fraction": 0.5}`.
    """
    from LymphNodeClassifierLib import model_registry

    scene = scene or (getattr(slicer, "mrmlScene", None) or slicer.vtkMRMLScene())
    with tempfile.TemporaryDirectory(prefix="lymphnode-training-", dir=work_dir) as tmp:
        cohort = make_tiny_cohort(Path(tmp) / "cohort")
        models = Path(tmp) / "models"
        run = TrainingRun(scene, cohort, models, {**TINY_OPTIONS, "compare_model": "none", **(options or {})}, python=python)
        run.start()
        run.wait(timeout)
        if not run.finished:
            run.cancel(wait=True)
            raise AssertionError(f"the tiny training run did not finish in {timeout:.0f} s")
        assert run.outcome == "done", f"the tiny training run ended with '{run.outcome}': {run.message}"
        epochs_run = run.done_event["training"]["epochs_run"]
        assert run.curves.rows == epochs_run, f"{run.curves.rows} curve rows for {epochs_run} epochs"
        model_path = Path(run.model_path)
        assert model_path.parent == models and model_path.is_file(), f"no model at {model_path}"
        card = model_registry.read_entry(model_path)
        assert card.ok, card.error
        rows = table_rows(run.results_node)
        labels = [row[0] for row in rows]
        metric_rows = [label for label, _ in RESULT_METRICS]
        assert labels[2:] == [*metric_rows, CONFUSION_ROW, *(label for label, _ in CALIBRATION_METRICS), THRESHOLD_ROW], labels
        by_label = dict(zip(labels, rows))
        assert by_label[CONFUSION_ROW][3], by_label[CONFUSION_ROW]
        test_nodes = run.done_event["comparison"]["test_set"]["nodes"]
        for text in (by_label[CONFUSION_ROW][1], by_label[CONFUSION_ROW][3]):  # new model, size rule: the counts add up
            assert sum(int(v) for v in text.split(" / ")) == test_nodes, (text, test_nodes)
        for label, _ in CALIBRATION_METRICS:  # new model and size rule have a calibration on the test nodes
            assert by_label[label][1] != "n/a" and by_label[label][3] != "n/a", by_label[label]
        assert by_label[THRESHOLD_ROW][1] and by_label[THRESHOLD_ROW][3], by_label[THRESHOLD_ROW]
        reliability = run.reliability_chart_node
        assert reliability is not None and reliability.GetNumberOfPlotSeriesNodes() >= 3, "no reliability diagram"
        chart = run.roc_chart_node
        assert chart is not None and chart.GetNumberOfPlotSeriesNodes() >= 2, "no ROC chart"
        roc_table = run.roc_nodes[1].GetTable()
        for column in range(roc_table.GetNumberOfColumns()):  # every curve runs from (0, 0) to (1, 1)
            values = [roc_table.GetValue(r, column).ToDouble() for r in range(roc_table.GetNumberOfRows())]
            values = [v for v in values if math.isfinite(v)]
            assert values[0] == 0.0 and values[-1] == 1.0, (roc_table.GetColumnName(column), values)
        assert model_registry.active_model(models) is None
        model_registry.set_active_model(models, model_path)
        assert model_registry.active_model(models).resolve() == model_path.resolve(), "make active did not switch the model"
        result = {"model": model_path.name, "epochs_run": epochs_run, "results": rows, "progress": run.progress,
                  "chart_title": run.curves.chart_node.GetTitle(), "comparison": run.done_event["comparison"]}
        result["roc_series"] = chart.GetNumberOfPlotSeriesNodes()
        result["reliability_series"] = reliability.GetNumberOfPlotSeriesNodes()
        for node in run.curves.nodes() + [run.results_node] + run.roc_nodes + run.reliability_nodes:
            scene.RemoveNode(node)
    return result


def scenario_suspects_process(work_dir: str | os.PathLike | None = None, python: str | None = None, timeout: float = 300.0) -> dict:
    """The Curation tab's suspect search end to end: a background process writes suspects.csv into a
    noisy phantom cohort's folder, one row per labelled node, ranked, and the curation logic shows it."""
    import csv

    from LymphNodeClassifierLib.phantoms import generate_cohort

    with tempfile.TemporaryDirectory(prefix="lymphnode-suspects-", dir=work_dir) as tmp:
        cohort = Path(tmp) / "cohort"
        dataset = generate_cohort(cohort, cases=TINY_COHORT["cases"], seed=TINY_COHORT["seed"], label_noise=0.2)
        process = SuspectsProcess(cohort, folds=3, python=python)
        process.start()
        process.wait(timeout)
        if not process.finished:
            process.cancel(wait=True)
            raise AssertionError(f"the suspect search did not finish in {timeout:.0f} s")
        event = process.final_event or {}
        assert event.get("event") == "done", f"the suspect search ended with {event}: {process.stderr_tail()[-500:]}"
        with open(cohort / "suspects.csv", newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        keys = {(row["case_id"], int(row["label_value"])) for row in rows}
        assert keys == {(n.case_id, n.label_value) for n in dataset.nodes}, "every labelled node is ranked once"
        assert [int(row["rank"]) for row in rows] == list(range(1, len(rows) + 1))
        stages = {e["stage"] for e in process.events if e.get("event") == "progress"}
        assert stages == {"patches", "features"}, stages
        return {"nodes": len(rows), "flagged": event["n_issues"], "status": process.status(), "seconds": event["seconds"]}
