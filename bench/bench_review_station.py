"""Review station timings on a clinical-size CT: start to a usable page, and a node-row click to all three views redrawn.

A one-case dataset with a 512 x 512 x 110 phantom CT (10 nodes, `phantoms.generate_case(clinical_size=True)`)
is served by the real `review` command (its own process); Debian's chromium (headless, Selenium)
loads the page, opens the case (which classifies it) and clicks every node row in turn. A click is
timed in the page: from the click to the `load` event of the next frame of each of the three slice
views (the slowest of the three counts). Targets: a row click under 0.5 s.

Same-run reference: the same clicks on the bundled sample CT (411 x 289 x 20), to tell what the
CT size costs from what the machine (its load) costs.

Needs chromium + chromedriver (`make browser`) and the test requirements; prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "LymphNodeClassifier"))
sys.path.insert(0, str(REPO / "Testing"))

from test_review_station import (  # noqa: E402  (the browser harness of the station's tests)
    SAMPLE_DATASET,
    Station,
    browser_unavailable,
    chrome,
    click_and_time_views,
    load_page,
    open_case,
    press,
    rows,
    sample_dataset_with_suspects,
    state,
    wait_for,
)


def clinical_dataset(folder: Path, seed: int) -> tuple[Path, str, tuple[int, ...]]:
    from LymphNodeClassifierLib.dataset import Dataset
    from LymphNodeClassifierLib.phantoms import generate_case, write_case

    case = generate_case(seed, clinical_size=True)
    images = folder / "images"
    images.mkdir(parents=True)
    write_case(case, images / "C1_ct.nrrd", images / "C1_labels.nrrd")
    dataset = Dataset.create(folder, "review station benchmark (clinical-size phantom)")
    dataset.add_case("C1", "P1", "images/C1_ct.nrrd", "images/C1_labels.nrrd")
    for node in case.nodes:
        dataset.add_node("C1", int(node["label_value"]), int(bool(node["metastatic"])))
    dataset.save()
    return folder, "C1", tuple(case.ct.GetSize())


def time_clicks(driver, station: Station, case_id: str, rounds: int) -> dict:
    page_s = load_page(driver, station.url)
    ready_s = time.perf_counter() - station.started
    start = time.perf_counter()
    nodes = open_case(driver, case_id)
    open_s = time.perf_counter() - start
    clicks = []
    for _ in range(rounds):
        for value in sorted(nodes, key=int):
            clicks.append(click_and_time_views(driver, rows(driver, "lnc-nodes", "data-node")[value]))
    return {"start_to_usable_page_s": round(ready_s, 2), "page_load_s": round(page_s, 2), "open_and_classify_s": round(open_s, 2),
            "clicks": len(clicks), "click_to_views_median_s": round(statistics.median(clicks), 3),
            "click_to_views_p90_s": round(sorted(clicks)[int(0.9 * (len(clicks) - 1))], 3),
            "click_to_views_max_s": round(max(clicks), 3)}


def click_cpu_in_process(folder: Path, case_id: str, rounds: int) -> dict:
    """What a click costs the station itself, in this process: select the node (controller, centring,
    state) and render the three views at the page's size; wall and CPU seconds (CPU counts every
    thread, Mesa's too, and is what an idle machine would take in wall time, less encoding and transport)."""
    from LymphNodeClassifierLogic.review_app import ReviewStation

    station = ReviewStation(folder, reader="bench-in-process", models_folder=folder.parent / "models")  # as the stations: the bundled model
    try:
        station.open_case(case_id)
        views = station.slice_views()
        for view in views:  # the page's view size (365 x 415 px at a 1400 px wide window)
            view.render_window().SetSize(365, 415)
            view.update_size(365, 415)
        values = [row["label_value"] for row in station.state.nodes]
        wall, cpu = [], []
        for _ in range(rounds):
            for value in values:
                wall_start, cpu_start = time.perf_counter(), time.process_time()
                station.select_node(value)
                for view in views:
                    view.render_window().Render()
                wall.append(time.perf_counter() - wall_start)
                cpu.append(time.process_time() - cpu_start)
    finally:
        station.controller.cleanup()
    return {"clicks": len(cpu), "wall_median_s": round(statistics.median(wall), 3), "cpu_median_s": round(statistics.median(cpu), 3),
            "cpu_max_s": round(max(cpu), 3)}


def screenshots(work: Path, out: Path) -> list[Path]:
    """The README's pictures: reader alice on the sample case (node 3 read benign), then reader bob's page."""
    folder = sample_dataset_with_suspects(work / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    driver = chrome(1500, 950)
    written = []
    try:
        for reader, key, name in (("alice", "b", "review_station.png"), ("bob", None, "review_second_reader.png")):
            station = Station(folder, reader)
            try:
                load_page(driver, station.url)
                open_case(driver, "P0001-S1")
                rows(driver, "lnc-nodes", "data-node")["3"].click()
                wait_for(lambda: state(driver, "selected") == 3, what="node 3")
                if key:
                    press(driver, key)
                    wait_for(lambda: {r["label_value"]: r for r in state(driver, "nodes")}[3]["my_read"], what="the read")
                time.sleep(2.0)  # the still (full-quality) frames follow the interactive ones
                driver.save_screenshot(str(out / name))
                written.append(out / name)
            finally:
                station.stop()
    finally:
        driver.quit()
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=20261123)
    parser.add_argument("--rounds", type=int, default=3, help="clicks on every node row, this many times over")
    parser.add_argument("--screenshots", metavar="DIR", help="only write the README's screenshots (review_*.png) into DIR")
    args = parser.parse_args()
    missing = browser_unavailable()
    if missing:
        print(f"skipped: {missing}")
        return 0
    work = Path(tempfile.mkdtemp(prefix="lnc-review-bench-"))
    if args.screenshots:
        try:
            for path in screenshots(work, Path(args.screenshots)):
                print(f"wrote {path}")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    try:
        folder, case_id, size = clinical_dataset(work / "clinical", args.seed)
        sample = work / "sample"
        shutil.copytree(SAMPLE_DATASET, sample)
        results = {"load_average_1min": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
        driver = chrome()
        try:
            for name, dataset, case, shape in ((f"clinical {size[0]}x{size[1]}x{size[2]}", folder, case_id, size),
                                               ("sample 411x289x20 (reference)", sample, "P0001-S1", None)):
                station = Station(dataset, "bench")
                try:
                    results[name] = time_clicks(driver, station, case, args.rounds)
                finally:
                    station.stop()
        finally:
            driver.quit()
        results["clinical in-process select + render three views"] = click_cpu_in_process(folder, case_id, args.rounds)
        results["load_average_1min_after"] = round(os.getloadavg()[0], 2)
        print(json.dumps(results))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
