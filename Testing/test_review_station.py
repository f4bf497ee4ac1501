"""The browser review station (`review` command) driven in a real browser: Debian's chromium and
chromedriver through Selenium, against the station running as its own process (the real command).

What is checked, on a copy of the bundled sample dataset (7 nodes) with a small suspects.csv:
- the page lists the case; opening it lists exactly the dataset's nodes;
- clicking a node row moves all three Slicer slice views: each view's centre (its slice node's
  SliceToRAS, published by the server) equals the node's centroid computed here from the label
  file (mean voxel index -> physical point -> RAS), and the screenshot of the views changed;
- the keyboard (b, m, x) and the Benign button write journal lines with the reader's name and the
  old -> new read; a reload of the page shows them;
- a click on a suspect row selects that node and centres the views on it;
- a second reader (another station process, after the first) sees the first reader's read, and
  both readers' reads are kept (journal and dataset);
- security: a non-loopback --host without --token is refused in one line; on a non-loopback
  address of this machine (when it has one) every request without the token is refused, HTTP and
  websocket; on loopback, a foreign Host header (DNS rebinding) and a websocket from another
  origin are refused. Traffic only ever goes to this machine.

Times (start to usable page, click to the three views redrawn) are printed and written to
$LNC_REVIEW_TIMINGS when set; bench/bench_review_station.py measures them on a 512x512x100 CT.
"""

from __future__ import annotations

import csv
import fcntl
import ipaddress
import json
import os
import queue
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATASET = REPO / "LymphNodeClassifier" / "Resources" / "SampleData"
CASE_ID = "P0001-S1"
STATION_START_TIMEOUT_S = 180.0
WAIT_S = 60.0


# ---- what the browser tests need -------------------------------------------------------------------


def browser_unavailable() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements-test.txt)"
    for program, package in (("chromium", "chromium"), ("chromedriver", "chromium-driver")):
        if shutil.which(program) is None:
            return (f"{program} is not installed: `make browser` installs Debian's chromium and chromium-driver "
                    f"when run as root with apt (apt-get install {package})")
    for module in ("slicer", "trame_slicer"):
        try:
            __import__(module)
        except ImportError as error:
            return f"{module} is not importable ({error}); install requirements-test.txt"
    return None


BROWSER_MISSING = browser_unavailable()
needs_browser = pytest.mark.skipif(BROWSER_MISSING is not None, reason=BROWSER_MISSING or "")


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of one of this machine's own interfaces that is not loopback (None if none).

    Read from the interfaces themselves (SIOCGIFADDR), so no packet is sent anywhere; traffic to
    such an address stays on this machine but arrives as it would from the network.
    """
    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(probe.fileno(), siocgifaddr, struct.pack("256s", name[:15].encode()))
            except OSError:
                continue  # an interface without an IPv4 address
            address = socket.inet_ntoa(packed[20:24])
            if not ipaddress.ip_address(address).is_loopback:
                return address
    return None


def record_timing(name: str, seconds: float) -> None:
    print(f"review station timing: {name} = {seconds:.3f} s")
    path = os.environ.get("LNC_REVIEW_TIMINGS")
    if path:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"what": name, "seconds": round(seconds, 4)}) + "\n")


# ---- the station as a process ----------------------------------------------------------------------


class Station:
    """`python -m LymphNodeClassifierLib review ...` in its own process; `url` once it is ready."""

    def __init__(self, dataset: Path, reader: str, host: str = "127.0.0.1", token: str | None = None,
                 extra: tuple[str, ...] = ()) -> None:
        self.host, self.token = host, token
        # an empty model folder of its own: the bundled default model classifies, whatever another run made active
        models = dataset.parent / "models"
        models.mkdir(exist_ok=True)
        command = [sys.executable, "-m", "LymphNodeClassifierLib", "review", "--dataset", str(dataset), "--port", "0",
                   "--reader", reader, "--host", host, "--models", str(models), *(["--token", token] if token else []), *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self._wait_ready()
        self.port = int(self.url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])

    def _read(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + STATION_START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if line.startswith("review station for "):
                return line.split(" at ", 1)[1].split(" ", 1)[0]
        self.stop()
        output = "".join(self.output[-40:])
        if "cannot render Slicer views" in output:  # no OpenGL on this machine: the station says so in one line
            pytest.skip(output.strip().splitlines()[-1])
        raise AssertionError("the review station did not start:\n" + output)

    @property
    def base(self) -> str:
        return self.url.split("?", 1)[0]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


# ---- the browser -----------------------------------------------------------------------------------


def chrome(width: int = 1400, height: int = 1000):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    options.binary_location = shutil.which("chromium")
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def wait_for(predicate, timeout: float = WAIT_S, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def state(driver, name: str):
    return driver.execute_script("return window.trame && window.trame.state.get(arguments[0])", name)


def rows(driver, table: str, attribute: str) -> dict:
    from selenium.webdriver.common.by import By

    return {element.get_attribute(attribute): element for element in driver.find_elements(By.CSS_SELECTOR, f"#{table} tr[{attribute}]")}


def load_page(driver, url: str) -> float:
    """Load the page; seconds until the cases list shows."""
    start = time.perf_counter()
    driver.get(url)
    wait_for(lambda: rows(driver, "lnc-cases", "data-case"), what="the cases list")
    return time.perf_counter() - start


def open_case(driver, case_id: str) -> dict:
    if state(driver, "case_id") != case_id:
        rows(driver, "lnc-cases", "data-case")[case_id].click()
        wait_for(lambda: state(driver, "case_id") == case_id and rows(driver, "lnc-nodes", "data-node"), what=f"case {case_id}")
    return rows(driver, "lnc-nodes", "data-node")


# Clicks a row and resolves with, per view image, the milliseconds until its next frame has loaded.
CLICK_AND_TIME_VIEWS = """
const [row, done] = arguments;
const images = Array.from(document.querySelectorAll('#lnc-views img'));
const loaded = {};
const start = performance.now();
const finish = () => done(loaded);
images.forEach((image, index) => image.addEventListener('load', () => {
  if (!(index in loaded)) loaded[index] = performance.now() - start;
  if (Object.keys(loaded).length === images.length) finish();
}));
setTimeout(finish, 15000);
row.click();
"""


def click_and_time_views(driver, element) -> float:
    """Click `element`; seconds until all three slice views show a new frame."""
    driver.set_script_timeout(20)
    loaded = driver.execute_async_script(CLICK_AND_TIME_VIEWS, element)
    assert len(loaded) == 3, f"only views {sorted(loaded)} redrew after the click"
    return max(loaded.values()) / 1000.0


def views_screenshot(driver) -> np.ndarray:
    from PIL import Image
    from selenium.webdriver.common.by import By

    png = driver.find_element(By.ID, "lnc-views").screenshot_as_png
    return np.asarray(Image.open(BytesIO(png)).convert("RGB"), dtype=np.int16)


def press(driver, key: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    driver.execute_script("document.activeElement && document.activeElement.blur()")
    ActionChains(driver).send_keys(key).perform()


# ---- independent truths ----------------------------------------------------------------------------


def centroids_ras(labels_path: Path) -> dict[int, np.ndarray]:
    """label value -> RAS centroid: mean voxel index of the value, through the image's geometry, LPS -> RAS."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(labels_path))
    values = sitk.GetArrayFromImage(image)  # [k, j, i]
    out = {}
    for value in np.unique(values[values > 0]):
        k, j, i = np.nonzero(values == value)
        lps = np.array(image.TransformContinuousIndexToPhysicalPoint((float(i.mean()), float(j.mean()), float(k.mean()))))
        out[int(value)] = lps * np.array([-1.0, -1.0, 1.0])
    return out


def journal(dataset: Path) -> list[dict]:
    return [json.loads(line) for line in (dataset / "journal.jsonl").read_text(encoding="utf-8").splitlines()]


def node_record(dataset: Path, label_value: int) -> dict:
    manifest = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))
    return next(n for n in manifest["nodes"] if n["case_id"] == CASE_ID and n["label_value"] == label_value)


# ---- fixtures --------------------------------------------------------------------------------------


def sample_dataset_with_suspects(folder: Path) -> Path:
    """The bundled sample dataset copied to `folder`, with a two-row suspects.csv (the `suspects` command's columns)."""
    from LymphNodeClassifierLib.suspects import CSV_COLUMNS

    shutil.copytree(SAMPLE_DATASET, folder)
    manifest = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    labels = {n["label_value"]: n["metastatic"] for n in manifest["nodes"]}
    suspects = [(1, 4), (2, 2)]  # (rank, label value)
    with open(folder / "suspects.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(CSV_COLUMNS))
        writer.writeheader()
        for rank, value in suspects:
            given = labels[value]
            writer.writerow({"rank": rank, "case_id": CASE_ID, "patient_id": "P0001", "label_value": value, "given_label": given,
                             "oof_probability": 0.9 if given == 0 else 0.1, "suspicion": 0.9, "cleanlab_issue": "true",
                             "suggested_label": 1 - given, "fold": 0, "true_label": given, "label_flipped": "false"})
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return sample_dataset_with_suspects(tmp_path_factory.mktemp("review") / "sample")


@pytest.fixture(scope="module")
def truth() -> dict[int, np.ndarray]:
    return centroids_ras(SAMPLE_DATASET / "images" / f"{CASE_ID}_labels.nrrd")


@pytest.fixture(scope="module")
def alice(dataset):
    station = Station(dataset, "alice")
    yield station
    station.stop()


@pytest.fixture(scope="module")
def driver():
    browser = chrome()
    yield browser
    browser.quit()


# ---- tests that need no browser --------------------------------------------------------------------


def test_listen_address_rules():
    from LymphNodeClassifierLib.errors import InputError
    from LymphNodeClassifierLogic.review_app import check_listen_address, is_loopback_host

    assert [is_loopback_host(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost")] == [True] * 5
    assert [is_loopback_host(h) for h in ("0.0.0.0", "::", "10.1.2.3", "192.168.0.7", "example.org")] == [False] * 5
    check_listen_address("127.0.0.1", None)
    check_listen_address("10.1.2.3", "a-token")
    for host, token in (("0.0.0.0", None), ("10.1.2.3", None), ("example.org", None), ("10.1.2.3", "  ")):
        with pytest.raises(InputError):
            check_listen_address(host, token)


def test_non_loopback_host_without_token_is_refused_in_one_line(tmp_path):
    """Refused before anything starts: exit 2, one line that says what to do, nothing listening."""
    result = subprocess.run([sys.executable, "-m", "LymphNodeClassifierLib", "review", "--dataset", str(SAMPLE_DATASET),
                             "--host", "0.0.0.0", "--port", "0"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--token" in lines[0] and "0.0.0.0" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_folder_without_dataset_is_refused_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "LymphNodeClassifierLib", "review", "--dataset", str(tmp_path / "none")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr and "Traceback" not in result.stderr


# ---- in the browser --------------------------------------------------------------------------------


@needs_browser
def test_page_lists_the_dataset_nodes(alice, driver, dataset):
    page_s = load_page(driver, alice.url)
    record_timing("start to usable page (sample dataset)", time.perf_counter() - alice.started)
    record_timing("page load to cases list", page_s)
    assert set(rows(driver, "lnc-cases", "data-case")) == {CASE_ID}
    start = time.perf_counter()
    nodes = open_case(driver, CASE_ID)
    record_timing("open and classify the sample case", time.perf_counter() - start)
    manifest = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))
    assert sorted(int(v) for v in nodes) == sorted(n["label_value"] for n in manifest["nodes"] if n["case_id"] == CASE_ID)
    shown = {row["label_value"]: row for row in state(driver, "nodes")}
    for record in manifest["nodes"]:
        assert shown[record["label_value"]]["label"] == {1: "metastatic", 0: "benign"}[record["metastatic"]]
        assert 0.0 <= float(shown[record["label_value"]]["probability"]) <= 1.0  # classified on opening
    from LymphNodeClassifierLib.model import read_card
    from LymphNodeClassifierLogic.logic import DEFAULT_MODEL_PATH

    preprocessing = read_card(DEFAULT_MODEL_PATH)["preprocessing"]  # the CT is shown at the model's window
    assert state(driver, "window_text") == f"CT window {preprocessing['window_low']:g} to {preprocessing['window_high']:g} HU (the model's)"


@needs_browser
def test_row_click_centres_all_three_views_on_the_node(alice, driver, truth):
    load_page(driver, alice.url)
    open_case(driver, CASE_ID)
    timings = []
    for value in (3, 6):
        before = views_screenshot(driver)
        timings.append(click_and_time_views(driver, rows(driver, "lnc-nodes", "data-node")[str(value)]))
        wait_for(lambda: state(driver, "selected") == value, what=f"node {value} selected")
        centres = state(driver, "view_centres")
        assert set(centres) == {"Red", "Green", "Yellow"}
        for name, centre in centres.items():
            np.testing.assert_allclose(centre, truth[value], atol=0.01, err_msg=f"{name} view not centred on node {value}")
        after = views_screenshot(driver)
        assert after.shape == before.shape
        changed = np.abs(after - before).max(axis=2) > 16
        assert changed.mean() > 0.05, f"the views barely changed after clicking node {value} ({changed.mean():.3f})"
    record_timing("row click to three views redrawn (sample CT, worst of 2)", max(timings))

    # the Grad-CAM opacity control reaches the views: at 0 only the CT and the outlines remain
    with_cam = views_screenshot(driver)
    driver.execute_script("window.trame.state.set('cam_opacity', 0.0)")
    wait_for(lambda: (np.abs(views_screenshot(driver) - with_cam).max(axis=2) > 16).mean() > 0.02, what="the views without Grad-CAM")
    driver.execute_script("window.trame.state.set('cam_opacity', 0.4)")


@needs_browser
def test_keys_and_buttons_write_reads_with_the_reader_name(alice, driver, dataset):
    from selenium.webdriver.common.by import By

    load_page(driver, alice.url)
    open_case(driver, CASE_ID)
    before = len(journal(dataset))
    rows(driver, "lnc-nodes", "data-node")["3"].click()
    wait_for(lambda: state(driver, "selected") == 3, what="node 3 selected")
    assert node_record(dataset, 3)["metastatic"] == 1
    press(driver, "b")
    wait_for(lambda: len(journal(dataset)) > before, what="the journal line of 'b'")
    line = journal(dataset)[-1]
    assert (line["user"], line["target"], line["field"], line["old"], line["new"]) == ("alice", {"case_id": CASE_ID, "label_value": 3}, "read", None, 0)
    wait_for(lambda: node_record(dataset, 3)["metastatic"] == 0, what="dataset.json (saved after the journal line)")
    assert node_record(dataset, 3)["reads"] == {"alice": 0}  # a single reader's read decides the label
    press(driver, "n")  # next node: 4
    wait_for(lambda: state(driver, "selected") == 4, what="the next node")
    driver.find_element(By.ID, "lnc-benign").click()
    wait_for(lambda: journal(dataset)[-1]["target"] == {"case_id": CASE_ID, "label_value": 4}, what="the Benign button's line")
    assert (journal(dataset)[-1]["user"], journal(dataset)[-1]["new"]) == ("alice", 0)
    reason = driver.find_element(By.CSS_SELECTOR, "input#lnc-reason, #lnc-reason input")
    reason.send_keys("motion artefact")
    wait_for(lambda: state(driver, "exclude_reason") == "motion artefact", what="the reason in the server's state")
    press(driver, "n")
    wait_for(lambda: state(driver, "selected") == 5, what="node 5")
    press(driver, "x")
    wait_for(lambda: journal(dataset)[-1]["field"] == "excluded", what="the exclusion line")
    assert (journal(dataset)[-1]["user"], journal(dataset)[-1]["target"]["label_value"], journal(dataset)[-1]["reason"]) == ("alice", 5, "motion artefact")

    driver.find_element(By.CSS_SELECTOR, "input#lnc-note, #lnc-note input").send_keys("calcified rim")
    wait_for(lambda: state(driver, "note_text") == "calcified rim", what="the note in the server's state")
    driver.find_element(By.ID, "lnc-save-note").click()
    wait_for(lambda: journal(dataset)[-1]["field"] == "note", what="the note line")
    assert (journal(dataset)[-1]["user"], journal(dataset)[-1]["new"]) == ("alice", "calcified rim")

    driver.find_element(By.ID, "lnc-classify").click()  # the active model again (the bundled default here)
    wait_for(lambda: "classified" in (state(driver, "message") or "") and not state(driver, "busy"), what="the classification")
    assert all(row["probability"] for row in state(driver, "nodes"))

    driver.refresh()  # a reload shows the saved reads
    wait_for(lambda: rows(driver, "lnc-nodes", "data-node"), what="the nodes after a reload")
    shown = {row["label_value"]: row for row in state(driver, "nodes")}
    assert (shown[3]["label"], shown[3]["my_read"], shown[4]["my_read"], shown[5]["excluded"], shown[5]["note"]) == (
        "benign", "benign", "benign", True, "calcified rim")
    cells = rows(driver, "lnc-nodes", "data-node")["3"].find_element(By.CLASS_NAME, "lnc-my-read")
    assert cells.text == "benign"


@needs_browser
def test_suspect_click_selects_and_centres_on_its_node(alice, driver, truth):
    load_page(driver, alice.url)
    suspects = wait_for(lambda: rows(driver, "lnc-suspects", "data-suspect"), what="the suspect list")
    assert len(suspects) == 2
    suspects["1"].click()  # row 1 = rank 2: node 2
    wait_for(lambda: state(driver, "selected") == 2, what="the suspect's node")
    for centre in state(driver, "view_centres").values():
        np.testing.assert_allclose(centre, truth[2], atol=0.01)
    ranks = {row["label_value"]: row["rank"] for row in state(driver, "nodes")}
    assert (ranks[4], ranks[2], ranks[1]) == ("1", "2", "")
    # the page names cases by id only: a path is no case of the served dataset
    driver.execute_script("window.trame.trigger('open_case', ['../../../etc/passwd'])")
    wait_for(lambda: state(driver, "error"), what="the error line")
    assert "../../../etc/passwd" in state(driver, "error") and state(driver, "case_id") == CASE_ID


@needs_browser
def test_loopback_station_refuses_foreign_host_and_origin(alice):
    """Without a token (loopback only) a page of another site must not reach the station."""
    import asyncio
    import urllib.error
    import urllib.request

    import aiohttp

    def status(headers: dict) -> int:
        request = urllib.request.Request(alice.base + "index.html", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    assert status({}) == 200
    assert status({"Host": f"rebound.example:{alice.port}"}) == 403  # DNS rebinding: a foreign name resolving here
    for escape in ("/../../../etc/passwd", "/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/images/P0001-S1_ct.nrrd"):
        request = urllib.request.Request(f"http://127.0.0.1:{alice.port}{escape}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                body = response.read()
            code = response.status
        except urllib.error.HTTPError as error:
            code, body = error.code, b""
        assert code in (403, 404) and b"root:" not in body, f"{escape} answered {code}"

    async def websocket_status(origin: str) -> int:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(f"ws://127.0.0.1:{alice.port}/ws", headers={"Origin": origin}):
                    return 101
            except aiohttp.WSServerHandshakeError as error:
                return error.status

    assert asyncio.run(websocket_status(f"http://127.0.0.1:{alice.port}")) == 101
    assert asyncio.run(websocket_status("http://some-other-site.example")) == 403


@pytest.fixture(scope="module")
def bob(alice, dataset):
    """The second reader's station, after the first one stopped; on a non-loopback address with a token when this machine has one."""
    alice.stop()
    from LymphNodeClassifierLib.curation import CurationSession

    with CurationSession(dataset, user="alice") as session:  # alice's read of node 3, when her page test did not run
        session.read_node(CASE_ID, 3, 0)
    host = non_loopback_ipv4() or "127.0.0.1"
    station = Station(dataset, "bob", host=host, token="t0ken-for-the-review-test")
    yield station
    station.stop()


@needs_browser
def test_second_reader_sees_the_first_and_both_reads_are_kept(bob, driver, dataset):
    load_page(driver, bob.url)  # the link with ?token=
    assert state(driver, "cases")[0]["status"] == "read by others"
    open_case(driver, CASE_ID)
    shown = {row["label_value"]: row for row in state(driver, "nodes")}
    assert (shown[3]["other_reads"], shown[3]["my_read"], shown[3]["label"]) == ("alice: benign", "", "benign")
    rows(driver, "lnc-nodes", "data-node")["3"].click()
    wait_for(lambda: state(driver, "selected") == 3, what="node 3")
    press(driver, "m")
    wait_for(lambda: journal(dataset)[-1]["user"] == "bob", what="bob's line")
    reads = [(line["user"], line["old"], line["new"]) for line in journal(dataset)
             if line["field"] == "read" and line["target"] == {"case_id": CASE_ID, "label_value": 3}]
    assert reads == [("alice", None, 0), ("bob", None, 1)]
    # neither read overwrote the other (dataset.json is replaced just after the journal line)
    wait_for(lambda: node_record(dataset, 3).get("reads") == {"alice": 0, "bob": 1}, what="both reads in dataset.json")
    wait_for(lambda: {r["label_value"]: r for r in state(driver, "nodes")}[3]["my_read"] == "metastatic", what="bob's read shown")
    assert {r["label_value"]: r for r in state(driver, "nodes")}[3]["source"].startswith("tie of 2 readers")  # curation's rule


@needs_browser
def test_requests_without_the_token_are_refused_on_a_non_local_address(bob):
    import asyncio
    import urllib.error
    import urllib.request

    import aiohttp

    if bob.host == "127.0.0.1":
        pytest.skip("this machine has no non-loopback address to listen on")

    def status(url: str, headers: dict | None = None) -> int:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    base = bob.base
    assert status(base + "index.html") == 403
    assert status(base + "index.html?token=wrong") == 403
    assert status(base + f"index.html?token={bob.token}") == 200
    assert status(base + "index.html", {"Authorization": f"Bearer {bob.token}"}) == 200

    async def websocket_status(query: str) -> int:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.ws_connect(f"ws://{bob.host}:{bob.port}/ws{query}"):
                    return 101
            except aiohttp.WSServerHandshakeError as error:
                return error.status

    assert asyncio.run(websocket_status("")) == 403
    assert asyncio.run(websocket_status(f"?token={bob.token}")) == 101
