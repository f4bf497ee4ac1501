"""Cohorts: `classify --dataset` with --workers and --shard, and merge-results, give the single run's outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from LymphNodeClassifierLib import classify, cohort
from LymphNodeClassifierLib.cli import main as cli_main
from LymphNodeClassifierLib.errors import InputError


@pytest.mark.parametrize("text, expected", [("1/1", (1, 1)), ("2/4", (2, 4)), (" 4 / 4 ", (4, 4)), (None, None)])
def test_parse_shard(text, expected):
    assert cohort.parse_shard(text) == expected


@pytest.mark.parametrize("text", ["0/4", "5/4", "2", "a/b", "-1/2", "2/0"])
def test_parse_shard_refuses_a_bad_split(text):
    with pytest.raises(InputError, match=r"--shard must be I/N with 1 <= I <= N"):
        cohort.parse_shard(text)


def test_shards_split_by_patient_exactly_and_evenly():
    rng = np.random.default_rng(3)
    cases = [SimpleNamespace(case_id=f"c{k:03d}", patient_id=f"P{rng.integers(0, 40):02d}") for k in range(100)]
    for count in (1, 2, 3, 7):
        shards = [cohort.shard_cases(cases, (index, count)) for index in range(1, count + 1)]
        ids = [case.case_id for shard in shards for case in shard]
        assert sorted(ids) == sorted(case.case_id for case in cases), "every case in exactly one shard"
        patients = [{case.patient_id for case in shard} for shard in shards]
        assert sum(len(p) for p in patients) == len({case.patient_id for case in cases}), "a patient's cases stay together"
        sizes = [len(p) for p in patients]
        assert max(sizes) - min(sizes) <= 1, "patients are dealt evenly"
        for shard in shards:  # dataset order kept inside a shard
            assert [case.case_id for case in shard] == sorted(case.case_id for case in shard)
    # the split depends on the patients, not on the order the cases are listed in
    shuffled = list(reversed(cases))
    assert {c.case_id for c in cohort.shard_cases(shuffled, (2, 3))} == {c.case_id for c in cohort.shard_cases(cases, (2, 3))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cohort") / "dataset"
    assert cli_main(["phantoms", "--out", str(folder), "--cases", "3", "--seed", "41"]) == 0
    return folder


def run(*arguments: str) -> None:
    assert classify.main(list(arguments)) == 0


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def case_arrays(folder: Path, name: str) -> dict[str, np.ndarray]:
    return {case.name: sitk.GetArrayFromImage(sitk.ReadImage(str(case / name))) for case in sorted(folder.iterdir())
            if case.is_dir() and case.name != cohort.SHARDS_FOLDER}


def test_workers_and_shards_give_the_single_process_results(dataset, tmp_path):
    single, pooled, sharded = tmp_path / "single", tmp_path / "pooled", tmp_path / "sharded"
    run("--dataset", str(dataset), "--out", str(single), "--no-report")
    run("--dataset", str(dataset), "--out", str(pooled), "--no-report", "--workers", "2")
    run("--dataset", str(dataset), "--out", str(sharded), "--no-report", "--shard", "2/2")
    with pytest.raises(InputError, match="Shard 1 of 2 has no results"):
        cohort.merge_results(sharded)
    assert not (sharded / "nodes.csv").exists()
    run("--dataset", str(dataset), "--out", str(sharded), "--no-report", "--shard", "1/2")
    assert cli_main(["merge-results", "--out", str(sharded)]) == 0

    expected = (single / "nodes.csv").read_bytes()
    rows = read_rows(single / "nodes.csv")
    assert len({row["case_id"] for row in rows}) == 3 and len(rows) >= 6
    assert (pooled / "nodes.csv").read_bytes() == expected
    assert (sharded / "nodes.csv").read_bytes() == expected
    summary = json.loads((single / "summary.json").read_text())
    assert summary["cases_classified"] == 3 and summary["nodes"] == len(rows) == summary["labelled_nodes"]
    assert json.loads((pooled / "summary.json").read_text()) == summary
    assert json.loads((sharded / "summary.json").read_text()) == summary | {"shards": 2}
    for other in (pooled, sharded):
        for name in ("nodes.seg.nrrd", "gradcam.nrrd"):
            mine, theirs = case_arrays(single, name), case_arrays(other, name)
            assert mine.keys() == theirs.keys() and len(mine) == 3
            for case_id in mine:
                np.testing.assert_allclose(theirs[case_id], mine[case_id], atol=1e-6, err_msg=f"{other.name} {case_id} {name}")


def test_a_shard_leaves_the_other_shards_cases_alone(dataset, tmp_path):
    out = tmp_path / "out"
    run("--dataset", str(dataset), "--out", str(out), "--no-report", "--no-gradcam")
    before = {case.name for case in out.iterdir() if case.is_dir()}
    run("--dataset", str(dataset), "--out", str(out), "--no-report", "--no-gradcam", "--shard", "1/3")
    assert {case.name for case in out.iterdir() if case.is_dir()} == before | {cohort.SHARDS_FOLDER}
    shard = json.loads((out / "shards" / "shard-1-of-3.json").read_text())
    dataset_cases = json.loads((dataset / "dataset.json").read_text())["cases"]
    patients = {case["case_id"]: case["patient_id"] for case in dataset_cases}
    mine = [case_id for _, case_id in shard["cases_in_dataset_order"]]
    assert 0 < len(mine) < len(dataset_cases)
    assert {case_id for case_id, patient in patients.items() if patient in {patients[c] for c in mine}} == set(mine)  # whole patients
    # shards of another split, or of another run, are not merged together
    run("--dataset", str(dataset), "--out", str(out), "--no-report", "--shard", "2/3")
    run("--dataset", str(dataset), "--out", str(out), "--no-report", "--no-gradcam", "--shard", "3/3")
    with pytest.raises(InputError, match="different runs"):
        cohort.merge_results(out)


@pytest.mark.parametrize("arguments, message", [
    (["--workers", "2"], "use them with --dataset"),
    (["--shard", "1/2"], "use them with --dataset"),
])
def test_cohort_options_need_a_dataset(tmp_path, arguments, message):
    with pytest.raises(InputError, match=message):
        classify.main(["--ct", str(tmp_path / "ct.nrrd"), "--labels", str(tmp_path / "l.nrrd"), "--out", str(tmp_path / "o"), *arguments])


def test_bad_worker_count_and_empty_merge(dataset, tmp_path):
    with pytest.raises(InputError, match="--workers must be at least 1"):
        classify.main(["--dataset", str(dataset), "--out", str(tmp_path / "o"), "--workers", "0"])
    with pytest.raises(InputError, match="no shard results"):
        cohort.merge_results(tmp_path)
