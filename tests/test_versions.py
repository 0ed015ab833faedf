"""A failed rebuild never takes away the last good dataset: the CLI is SIGKILLed at each step of a
rebuild over changed input (planning, mid-shard, after its parts and before the version file, after the
version file and before the pointer, after the pointer and before the clean-up), and after each kill the
folder verifies clean for the version that is current; a re-run then finishes the new one, with the rows
of a clean build."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from dafactory.tasks.config import PreferenceConfig, build_config
from dafactory.tasks.io.commit import vacuum
from dafactory.tasks.io.schemas import TABLES
from dafactory.tasks.io.storage import FAILPOINT, DatasetDir
from dafactory.tasks.io.verify import verify
from tests.conftest import ROOT, own_home, write_jsonl


def run_cli(tmp_path, cfg, failpoint: str | None = None, env_extra: dict | None = None) -> int:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))
    env = own_home(tmp_path / "home")
    env.pop("PREFECT_API_URL", None)
    env.pop(FAILPOINT, None)
    env |= env_extra or {}
    if failpoint:
        env[FAILPOINT] = failpoint
    with open(tmp_path / "cli.log", "a") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dafactory.flows.cli", "run", "preference", "--config", str(path)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        code = proc.wait(timeout=600)
    if code < 0:  # the flow process died; its Ray workers and Prefect server would live on
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return code


KILL_POINTS = ["plan", "shard", "parts", "version", "pointer"]


def row_keys(ds: DatasetDir, manifest: dict | None = None) -> dict[str, set]:
    """Each sample table's rows as a set of (prompt_id, sample), and each per-prompt table's as prompt ids:
    what two builds of one input must agree on, whatever order or parts they were written in."""
    out = {}
    for table in ("candidates", "best", "pairs", "quarantine", "prompts"):
        rows = ds.read_table(table, manifest).to_pylist()
        out[table] = {(r["prompt_id"], r.get("sample_idx", r.get("chosen_sample_idx")),
                       r.get("response", r.get("reason"))) for r in rows}
    return out


def killed_rebuilds(tmp_path, output: str, points: list[str], env: dict | None = None) -> None:
    """`env`: more environment for the CLI's processes (an older s3fs on PYTHONPATH)."""
    def config(prompts: list[str], dataset="v") -> PreferenceConfig:
        path = write_jsonl(tmp_path / f"{dataset}.jsonl", [{"prompt": p} for p in prompts])
        return build_config(PreferenceConfig, None, [
            f"output={output}", f"dataset={dataset}", f"prompts.path={path}", "student.backend=fake", "n=2",
            "shard_size=2", "student.num_cpus=0.5", "scoring.num_cpus=0.5",
            "compact_shards=2",  # the kills also land amid compaction (groups of 2 shards, for readers)
            # no encoder in these processes: the oldest-s3fs run puts an old botocore on the path, and
            # transformers' import of accelerate pulls in boto3, which needs a newer one
            "decontamination.embedding=false",
        ])

    first = [f"question number {i}" for i in range(8)]
    assert run_cli(tmp_path, config(first), env_extra=env) == 0, (tmp_path / "cli.log").read_text()[-3000:]
    ds = DatasetDir(output, "v")
    v1 = ds.read_manifest()
    assert (v1["version"], v1["accounting"]["source_rows"], verify(ds).problems) == (1, 8, [])

    prompts = ["a new first question", *first[:5], "question number 5, reworded", *first[6:], "one more"]
    changed = config(prompts)
    expected = 1
    for point in points:
        assert run_cli(tmp_path, changed, failpoint=point, env_extra=env) == -signal.SIGKILL, point
        current = ds.read_manifest()
        # a kill after the version file leaves the new version committed, whatever manifest.json says
        expected += point in ("version", "pointer")
        assert (point, current["version"], current["status"]) == (point, expected, "complete")
        assert (point, verify(ds).problems) == (point, [])
        assert ds.read_table("candidates").num_rows == current["tables"]["candidates"]["rows"]

    assert run_cli(tmp_path, changed, env_extra=env) == 0, (tmp_path / "cli.log").read_text()[-3000:]
    last = ds.read_manifest()
    assert (last["accounting"]["source_rows"], last["status"], verify(ds).problems) == (10, "complete", [])
    if "shard" in points:
        assert last["shards"]["resumed"] > 0  # the killed runs' shards were kept
    assert json.loads(ds.fs.cat(ds._path("manifest.json")))["version"] == last["version"]  # the pointer
    # the rows equal a clean build's of the same inputs (the first, then the changed one: a folder keeps its
    # id ranges, and so its shards, while the input fits them), in another folder, never killed
    assert run_cli(tmp_path, config(first, dataset="clean"), env_extra=env) == 0
    assert run_cli(tmp_path, config(prompts, dataset="clean"), env_extra=env) == 0
    clean = DatasetDir(output, "clean")
    assert row_keys(ds) == row_keys(clean) and ds.read_table("candidates").num_rows == 20
    # vacuum with no window and no earlier version kept leaves exactly the current version's parts
    vacuum(ds, list(TABLES), keep_versions=0, retention_hours=0)
    assert ds.versions() == [last["version"]] and verify(ds).problems == []
    left = {f"{t}/part-{n}.parquet" for t in TABLES for n in ds.parts(t)}
    assert left == {f for files in ds.files(last).values() for f in files}
    compacts = {f"{t}/{e['name']}" for t in TABLES for e in ds.listing(t) if e["name"].startswith("compact-")}
    assert compacts == set(ds.compacted(last).values()) and len(compacts) > 0


@pytest.mark.slow
def test_a_killed_rebuild_keeps_the_last_version_on_local_disk(tmp_path):
    killed_rebuilds(tmp_path, str(tmp_path / "out"), KILL_POINTS)


@pytest.mark.slow
def test_a_failed_rebuild_keeps_the_last_version(tmp_path, run_flow):
    from dafactory.tasks.generate.error_rate import TooManyErrors

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"question number {i}"} for i in range(6)])
    common = [f"output={tmp_path / 'out'}", "dataset=v", f"prompts.path={path}", "student.backend=fake", "n=2",
              "shard_size=2", "student.num_cpus=0.5", "scoring.num_cpus=0.5", "shard_retries=0", "retries=0",
              # the backend raises on any prompt holding "poison"; max_error_rate 0: one such prompt fails its
              # shard (and the run, before it commits)
              "student.params.fail_on=poison", "max_error_rate=0"]
    run_flow(build_config(PreferenceConfig, None, common))
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"question number {i}"} for i in range(6)]
                + [{"prompt": "poison question"}])
    # the new prompt's shard (the folder keeps its 3 id ranges: the poison shares one with "question
    # number 3") fails every time: the rebuild fails, and version 1 stays the dataset
    with pytest.raises(TooManyErrors, match=r"generation failed on 1 of 7 prompts so far .*; version 1 stays the "
                                            r"dataset"):
        run_flow(build_config(PreferenceConfig, None, common))
    ds = DatasetDir(str(tmp_path / "out"), "v")
    assert ds.read_manifest()["version"] == 1 and verify(ds).problems == []
    assert ds.read_rebuild()["shards"]["failed"][0]["prompts"] == 2
    shown = subprocess.run([sys.executable, "-m", "dafactory.flows.cli", "inspect", ds.uri], capture_output=True,
                           text=True, cwd=ROOT)
    assert "a rebuild is INCOMPLETE (2 of 3 shards, 1 failed" in shown.stdout
    # fixed input: the re-run resumes the shards written, commits version 2 and shows what changed
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"question number {i}"} for i in range(6)]
                + [{"prompt": "a good question"}])
    manifest = run_flow(build_config(PreferenceConfig, None, common))
    assert (manifest["version"], manifest["shards"]["resumed"], manifest["shards"]["built"]) == (2, 2, 1)
    assert ds.read_rebuild() is None
    diff = subprocess.run([sys.executable, "-m", "dafactory.flows.cli", "inspect", ds.uri, "--version", "1"],
                          capture_output=True, text=True, cwd=ROOT)
    assert "version 1" in diff.stdout and "-> version 2" in diff.stdout
    assert "candidates rows                12 -> 14       (+2)" in diff.stdout


def test_completeness_goes_by_shard_id_not_by_the_index_a_resumed_shard_kept():
    """Resumed shards keep the index of the plan that built them: after the id ranges with prompts change,
    two done shards can carry one index. Every planned shard id is done: complete."""
    from dafactory.tasks.io.manifest import build_manifest
    from dafactory.tasks.io.storage import ShardRef
    from dafactory.tasks.run.planner import Plan

    plan = Plan(shards=[ShardRef(f"s{i}", i, 1, f"s{i}@h") for i in range(4)], source_rows=4)
    # cases: (shard ids with stats, their indices) -> status
    cases = [
        ((["s0", "s1", "s2", "s3"], [0, 0, 1, 2]), "complete"),  # indices collide (two resumed from old plans)
        ((["s0", "s1", "s2", "old"], [0, 1, 2, 3]), "incomplete"),  # four indices, but s3 is not done
        ((["s0", "s1", "s2"], [0, 1, 2]), "incomplete"),
    ]
    for (ids, indices), status in cases:
        stats = [{"shard_id": sid, "shard_index": i, "prompts": 1, "prompts_out": 1} for sid, i in zip(ids, indices)]
        manifest = build_manifest(config={}, fingerprint="f", plan=plan, shard_stats=stats, counts={},
                                  outcomes_key="x", timings={}, models={}, replaced_parts=0,
                                  report={"failed": [], "stopped": None, "resumed": 2, "built": 2})
        assert (ids, manifest["status"]) == (ids, status)


def _folder_copy(ds: DatasetDir, tmp_path, name: str) -> DatasetDir:
    import shutil

    shutil.copytree(ds.root, tmp_path / "copies" / name)
    return DatasetDir(str(tmp_path / "copies"), name)


@pytest.mark.slow
def test_verify_names_missing_stray_and_truncated_parts_and_garbage_versions(tmp_path, run_flow):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"question number {i}"} for i in range(8)])
    cfg = build_config(PreferenceConfig, None, [
        f"output={tmp_path / 'out'}", "dataset=v", f"prompts.path={path}", "student.backend=fake", "n=2",
        "shard_size=2", "student.num_cpus=0.5", "scoring.num_cpus=0.5", "compact_shards=2"])
    v1 = run_flow(cfg)
    ds = DatasetDir(cfg.output, cfg.dataset)
    rows_before = row_keys(ds)
    pairs = sorted(ds.files(v1)["pairs"])
    marker = sorted(ds.files(v1)["candidates"])[0]
    compacts = sorted(c for c in set(ds.compacted(v1).values()) if c.startswith("candidates/"))
    assert len(compacts) == 2 and verify(ds).problems == []  # 4 shards, groups of 2

    # 0. compact files: one deleted, one truncated, one holding fewer rows than its parts
    held = pq.read_metadata(tmp_path / "out" / "v" / compacts[0]).num_rows
    for name, edit in (("c-gone", lambda f: f.unlink()),
                       ("c-cut", lambda f: f.write_bytes(f.read_bytes()[:100])),
                       ("c-short", lambda f: pq.write_table(pq.read_table(f).slice(1), f))):
        copy = _folder_copy(ds, tmp_path, name)
        edit(tmp_path / "copies" / name / compacts[0])
        want = {"c-gone": f"candidates: files the manifest lists but that do not exist: 1 ({copy._path(compacts[0])})",
                "c-cut": f"{compacts[0]}: unreadable compact file (Parquet magic bytes not found in footer. Either "
                         "the file is corrupted or this is not a parquet file.)",
                "c-short": f"{compacts[0]}: holds {held - 1} rows, its 2 parts hold {held}"}[name]
        assert verify(copy).problems == [want]

    # 1. a listed part deleted
    gone = _folder_copy(ds, tmp_path, "gone")
    (tmp_path / "copies" / "gone" / pairs[0]).unlink()
    assert any(p.startswith("pairs: files the manifest lists but that do not exist: 1") for p in verify(gone).problems)
    # 2. a shard whose marker is there, and whose pairs part is gone and no longer listed either (a version
    # that lost a table's part): the marker's stats say how many rows it had
    unlisted = _folder_copy(ds, tmp_path, "unlisted")
    lost = next(f for f in pairs if ds.footer(ds._path(f)).num_rows)
    files = dict(ds.files(v1), pairs=[f for f in pairs if f != lost])
    rows = {t: [ds.footer(ds._path(f)).num_rows for f in fs] for t, fs in files.items()}
    edited = dict(v1, parts_table=unlisted.write_parts_table(files, rows),
                  tables=dict(v1["tables"], pairs=dict(v1["tables"]["pairs"], rows=sum(rows["pairs"]))))
    (tmp_path / "copies" / "unlisted" / "_versions" / "manifest-000001.json").write_text(json.dumps(edited))
    problems = verify(unlisted).problems
    shard = lost.split("part-")[1].split("@")[0]
    assert any(p.startswith(f"shard {shard}: its marker says") and "pairs rows, the version lists no part" in p
               for p in problems), problems
    # 3. a bad actor: a stray file, a truncated marker part, a version file of garbage
    (tmp_path / "out" / "v" / "pairs" / "notes.txt").write_text("hello")
    data = (tmp_path / "out" / "v" / marker).read_bytes()
    (tmp_path / "out" / "v" / marker).write_bytes(data[: len(data) // 2])
    (tmp_path / "out" / "v" / "_versions" / "manifest-000002.json").write_bytes(b"\x00garbage")
    v = verify(ds)
    assert [p for p in v.problems if "unreadable part" in p] == [
        f"candidates: unreadable part {marker.split('/')[1]} (Parquet magic bytes not found in footer. Either the "
        "file is corrupted or this is not a parquet file.)"]
    (tmp_path / "out" / "v" / "pairs" / "compact-0123456789abcdef.parquet").write_bytes(b"left by a crash")
    v = verify(ds)
    assert v.notes == ["_versions/manifest-000002.json: unreadable version file, skipped (never current)",
                       "pairs/compact-0123456789abcdef.parquet: a compact file this version does not list (no version "
                       "lists it; vacuum removes it)",
                       "pairs/notes.txt: not a part (no version lists it; vacuum removes it)"]
    # the next build is not blocked: it takes version 3, builds the truncated marker's shard again
    v3 = run_flow(cfg)
    assert (v3["version"], v3["status"], v3["shards"]["built"], v3["shards"]["resumed"]) == (3, "complete", 1, 3)
    again = verify(ds)
    assert again.problems == [] and again.code == 0
    assert row_keys(ds) == rows_before  # the same rows as the first build


@pytest.mark.slow
def test_two_runs_into_one_folder_at_once_end_as_one_clean_build(tmp_path):
    """A second run starts while the first builds, after the prompt file was regenerated in place (a UI run
    during a scheduled one). Both finish; the folder's current version is a clean build of one input."""
    import time

    from tests.conftest import cli

    prompts = tmp_path / "p.jsonl"
    first = [f"question number {i}" for i in range(16)]
    second = first[:10] + [f"another question {i}" for i in range(6)]

    def config(dataset: str, path=prompts) -> PreferenceConfig:
        return build_config(PreferenceConfig, None, [
            f"output={tmp_path / 'out'}", f"dataset={dataset}", f"prompts.path={path}", "student.backend=fake",
            "n=2", "shard_size=2", "student.num_cpus=0.5", "scoring.num_cpus=0.5", "student.params.latency_s=0.3"])

    write_jsonl(prompts, [{"prompt": p} for p in first])
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = cli(tmp_path / "a", config("v"))
    ds = DatasetDir(str(tmp_path / "out"), "v")
    deadline = time.time() + 240
    while len(ds.parts("candidates")) < 2 and time.time() < deadline:  # the first is building
        time.sleep(0.2)
    write_jsonl(prompts, [{"prompt": p} for p in second])
    b = cli(tmp_path / "b", config("v"))
    assert a.wait(timeout=600) == 0, (tmp_path / "a" / "cli.log").read_text()[-3000:]
    assert b.wait(timeout=600) == 0, (tmp_path / "b" / "cli.log").read_text()[-3000:]
    final = ds.read_manifest()
    assert final["version"] == 2 and final["status"] == "complete" and verify(ds).problems == []
    # clean builds of each input, both at once, each from a file and into a folder of its own
    runs = {}
    for name, rows in (("clean-first", first), ("clean-second", second)):
        (tmp_path / name).mkdir()
        path = write_jsonl(tmp_path / name / "p.jsonl", [{"prompt": p} for p in rows])
        runs[name] = cli(tmp_path / name, config(name, path))
    assert all(run.wait(timeout=600) == 0 for run in runs.values())
    cleans = {name: row_keys(DatasetDir(str(tmp_path / "out"), name)) for name in runs}
    assert row_keys(ds) in cleans.values()
    assert row_keys(ds, ds.read_version(1)) in cleans.values()  # the version it replaced is whole too
    assert cleans["clean-first"] != cleans["clean-second"]


@pytest.mark.slow
def test_a_reader_in_a_loop_always_gets_one_whole_version_while_rebuilds_commit_and_vacuum(
        tmp_path, run_flow, monkeypatch):
    """`datasets.load_dataset` through the card, in a loop on another thread, while three rebuilds over
    new inputs commit and vacuum with no earlier version kept and a window of 10.8 s: every read
    succeeds and holds exactly one version's rows, while the vacuums remove what no reader can still need."""
    import threading
    import time

    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    path = tmp_path / "p.jsonl"
    inputs = [[f"question number {i} of input {k}" for i in range(8)] for k in range(4)]

    def build(rows):
        write_jsonl(path, [{"prompt": p} for p in rows])
        return run_flow(build_config(PreferenceConfig, None, [
            f"output={tmp_path / 'out'}", "dataset=v", f"prompts.path={path}", "student.backend=fake", "n=2",
            "shard_size=2", "student.num_cpus=0.5", "scoring.num_cpus=0.5", "keep_versions=0",
            "retention_hours=0.003", "compact_shards=2"]))  # the card lists compact files

    ds = DatasetDir(str(tmp_path / "out"), "v")
    listed = set(ds.files(build(inputs[0]))["candidates"])
    wholes = [set(ds.read_table("candidates").column("prompt_id").to_pylist())]
    stop, reads, errors = threading.Event(), [], []

    def reader():
        while not stop.is_set():
            try:
                table = datasets.load_dataset(ds.root, "candidates", split="train", download_mode="force_redownload")
                reads.append(set(table["prompt_id"]))
            except Exception as exc:  # noqa: BLE001 - any failed read fails the test below
                errors.append(repr(exc))

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    for k in range(3):
        time.sleep(5)
        manifest = build(inputs[k + 1])
        listed |= set(ds.files(manifest)["candidates"])
        wholes.append(set(ds.read_table("candidates", manifest).column("prompt_id").to_pylist()))
    stop.set()
    t.join(120)
    assert errors == [] and len(reads) >= 3
    assert all(r in wholes for r in reads)  # never a mix of two versions, never a part short
    assert {f"candidates/part-{n}.parquet" for n in ds.parts("candidates")} < listed  # vacuum removed some


@pytest.mark.slow
def test_compaction_gives_readers_one_file_per_group_and_a_rebuild_rewrites_only_changed_groups(tmp_path, run_flow):
    """Delta's OPTIMIZE for readers: 24 prompts in shards of 2, compacted 4 shards at a time. The card lists
    the compact files, `datasets` reads every row once through it, and a rebuild after one prompt changed
    writes new compact files only for the groups holding a changed shard."""
    import datasets
    import yaml

    path = tmp_path / "p.jsonl"
    prompts = [f"question number {i}" for i in range(24)]
    cfg = build_config(PreferenceConfig, None, [
        f"output={tmp_path / 'out'}", "dataset=v", f"prompts.path={path}", "student.backend=fake", "n=2",
        "shard_size=2", "student.num_cpus=0.5", "scoring.num_cpus=0.5", "compact_shards=4"])
    write_jsonl(path, [{"prompt": p} for p in prompts])
    v1 = run_flow(cfg)
    ds = DatasetDir(cfg.output, cfg.dataset)
    shards = len(ds.files(v1)["candidates"])
    groups1 = {}
    for part, c in ds.compacted(v1).items():
        groups1.setdefault(c, []).append(part)
    per_table = {t: sum(c.startswith(t + "/") for c in groups1) for t in ("candidates", "pairs", "best", "prompts")}
    # groups of 4 plan positions; a last group of one shard stays as its part
    assert per_table == {t: shards // 4 + (shards % 4 > 1) for t in per_table}, (shards, per_table)
    assert verify(ds).problems == []
    card = yaml.safe_load(ds.fs.cat(ds._path("README.md")).decode().split("---\n")[1])
    listed = {c["config_name"]: c["data_files"][0]["path"] for c in card["configs"]}
    assert len(listed["candidates"]) == -(-shards // 4)  # one file per group
    for table in ("candidates", "pairs", "prompts"):
        loaded = datasets.load_dataset(ds.root, table, split="train", cache_dir=str(tmp_path / "hf"))
        key = "sample_idx" if table == "candidates" else None
        got = sorted(zip(loaded["prompt_id"], loaded[key] if key else [0] * len(loaded)))
        parts = ds.read_table(table).to_pylist()
        assert got == sorted((r["prompt_id"], r[key] if key else 0) for r in parts)  # every row once

    mtimes = {e["name"]: e["mtime"] for e in ds.listing("candidates")}
    write_jsonl(path, [{"prompt": p} for p in prompts[:-1] + ["question number 23, reworded"]])
    v2 = run_flow(cfg)
    groups2 = {}
    for part, c in ds.compacted(v2).items():
        groups2.setdefault(c, []).append(part)
    changed = {c for c in groups2 if c.startswith("candidates/") and c not in groups1}
    kept = {c for c in groups2 if c.startswith("candidates/") and c in groups1}
    assert 1 <= len(changed) <= 2 and len(kept) >= per_table["candidates"] - 2  # one prompt moves: 1 or 2 shards
    new_shards = set(ds.files(v2)["candidates"]) - set(ds.files(v1)["candidates"])
    assert all(set(groups2[c]) & new_shards for c in changed)  # written because a member changed
    assert all(not set(groups2[c]) & new_shards for c in kept)
    after = {e["name"]: e["mtime"] for e in ds.listing("candidates")}
    assert all(after[c.split("/")[1]] == mtimes[c.split("/")[1]] for c in kept)  # not written again
    assert verify(ds).problems == [] and v2["shards"]["built"] == len(new_shards)
