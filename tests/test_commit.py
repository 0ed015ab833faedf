"""The commit protocol (tasks/io/commit.py) broken on purpose: a crash left between the version file and
the pointer, garbage in a version file, two writers racing for one version, vacuum with readers on an
older version, stray and truncated files. Pure: no Prefect or Ray."""

import json
import os
import time

import pytest

from dafactory.tasks.io.commit import commit, current, vacuum, version_name
from dafactory.tasks.io.schemas import QUARANTINE, TABLES, to_table
from dafactory.tasks.io.storage import DatasetDir


def qrows(n, tag="x"):
    return [{"prompt_id": f"{tag}{i}", "source_row": i, "prompt": "x", "reason": "empty", "detail": None}
            for i in range(n)]


def version_of(ds, names: list[str], status="complete") -> dict:
    """A manifest listing these quarantine parts (rows counted from the files)."""
    rows = sum(ds.read_part("quarantine", n).num_rows for n in names)
    return {"status": status, "tables": {"quarantine": {"rows": rows, "files": [f"quarantine/part-{n}.parquet"
                                                                                 for n in names]}}}


def write(ds, name, n):
    ds.write_part("quarantine", name, to_table(qrows(n, name), QUARANTINE))
    return name


def test_a_crash_between_the_version_file_and_the_pointer_never_blocks_a_later_commit(tmp_path):
    ds = DatasetDir(str(tmp_path), "d")
    v1, _ = commit(ds, lambda cur: version_of(ds, [write(ds, "a", 2)]))
    # what a run killed right after creating version 2 leaves: the version file, the old pointer
    crashed = version_of(ds, [write(ds, "b", 3)]) | {"version": 2, "previous_version": 1}
    (tmp_path / "d" / "_versions" / version_name(2)).write_text(json.dumps(crashed))
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["version"] == 1  # stale pointer
    # version 2 is committed: readers take it, and reading repairs the pointer
    assert ds.read_manifest()["version"] == 2 and ds.read_table("quarantine").num_rows == 3
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["version"] == 2
    v3, committed = commit(ds, lambda cur: version_of(ds, [write(ds, "c", 4)]))
    assert (v1["version"], v3["version"], v3["previous_version"], committed) == (1, 3, 2, True)
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["version"] == 3


@pytest.mark.parametrize("garbage", [
    b"\x00\x01 not json",  # a torn or corrupted write
    b'{"status": "complete", "tables": {}}',  # JSON without its own version number: not a version file
    b"",  # an empty object left by a failed upload
])
def test_a_version_file_with_garbage_is_skipped_and_its_number_never_reused(tmp_path, garbage):
    ds = DatasetDir(str(tmp_path), "d")
    commit(ds, lambda cur: version_of(ds, [write(ds, "a", 2)]))
    (tmp_path / "d" / "_versions" / version_name(2)).write_bytes(garbage)
    assert ds.read_manifest()["version"] == 1
    v, committed = commit(ds, lambda cur: version_of(ds, [write(ds, "b", 5)]))
    assert (v["version"], v["previous_version"], committed) == (3, 1, True)
    assert ds.read_manifest()["version"] == 3 and ds.read_table("quarantine").num_rows == 5


def test_the_loser_of_a_version_decides_again_on_the_winners_version(tmp_path):
    ds = DatasetDir(str(tmp_path), "d")
    commit(ds, lambda cur: version_of(ds, [write(ds, "a", 1)]))
    seen = []

    def decide(cur):
        seen.append(cur["version"])
        if len(seen) == 1:  # another run commits version 2 between our read and our create
            commit(ds, lambda c: version_of(ds, [write(ds, "other", 2)]))
        return version_of(ds, [write(ds, "ours", 3)])

    v, committed = commit(ds, decide)
    assert seen == [1, 2] and (v["version"], v["previous_version"], committed) == (3, 2, True)
    assert ds.versions() == [1, 2, 3] and ds.read_table("quarantine").num_rows == 3


def test_a_failed_rebuild_that_loses_the_race_to_a_complete_version_commits_nothing(tmp_path):
    ds = DatasetDir(str(tmp_path), "d")
    commit(ds, lambda cur: version_of(ds, [write(ds, "a", 1)], status="incomplete"))
    calls = []

    def decide(cur):
        calls.append(cur["status"])
        if len(calls) == 1:
            commit(ds, lambda c: version_of(ds, [write(ds, "done", 2)]))
        # the rule finalize applies: an incomplete build never replaces a complete version
        return None if cur["status"] == "complete" else version_of(ds, [write(ds, "partial", 1)], "incomplete")

    v, committed = commit(ds, decide)
    assert calls == ["incomplete", "complete"] and not committed and v["version"] == 2


def age(path, hours):
    t = time.time() - hours * 3600
    os.utime(path, (t, t))


def test_vacuum_keeps_what_a_retained_version_or_a_run_in_flight_needs(tmp_path):
    ds = DatasetDir(str(tmp_path), "d")
    q = tmp_path / "d" / "quarantine"
    versions = tmp_path / "d" / "_versions"
    commit(ds, lambda cur: version_of(ds, [write(ds, "v1", 1)]))
    commit(ds, lambda cur: version_of(ds, [write(ds, "v2", 1)]))
    commit(ds, lambda cur: version_of(ds, [write(ds, "v3", 1)]))
    write(ds, "inflight", 1)  # another run's part, not committed yet
    write(ds, "orphan", 1)  # a killed run's part
    (q / "notes.txt").write_text("a stray file")
    for name in ("v1", "v2", "v3", "orphan"):
        age(q / f"part-{name}.parquet", 100)
    age(q / "notes.txt", 100)
    # version 1 stopped being current 50 hours ago (version 2's commit), version 2 an hour ago
    age(versions / version_name(1), 200)
    age(versions / version_name(2), 50)
    age(versions / version_name(3), 1)
    # cases: (window in hours, keep_versions) -> versions kept, parts left
    cases = [
        # v1 was current within the window; the orphan (100 h old) may still be a run's that is building
        ((168, 0), [1, 2, 3], {"v1", "v2", "v3", "inflight", "orphan"}),
        ((24, 1), [2, 3], {"v2", "v3", "inflight"}),  # v1 out of the window and beyond keep_versions; orphan old
        ((0, 0), [3], {"v3"}),  # no window: only the current version's parts stay
    ]
    for (hours, keep), kept, parts in cases:
        done = vacuum(ds, list(TABLES), keep_versions=keep, retention_hours=hours)
        assert (done["retained_versions"], ds.versions(), set(ds.parts("quarantine"))) == (kept, kept, parts)
        assert ds.read_manifest()["version"] == 3 and ds.read_table("quarantine").num_rows == 1
    assert not (q / "notes.txt").exists()  # no version lists it


def test_a_reader_on_the_previous_version_keeps_its_files_after_a_commit(tmp_path):
    ds = DatasetDir(str(tmp_path), "d")
    old = commit(ds, lambda cur: version_of(ds, [write(ds, "a", 2), write(ds, "b", 2)]))[0]
    for p in (tmp_path / "d" / "quarantine").iterdir():
        age(p, 1000)  # parts written long ago
    new = commit(ds, lambda cur: version_of(ds, [write(ds, "c", 7)]))[0]
    vacuum(ds, list(TABLES), keep_versions=0, retention_hours=168)  # what the commit runs, with keep_versions 0
    # the previous version was current a moment ago: a reader that opened it still reads all of it
    assert ds.read_table("quarantine", old).num_rows == 4 and ds.read_table("quarantine", new).num_rows == 7


def test_current_is_none_before_the_first_commit_and_ignores_other_files(tmp_path):
    ds = DatasetDir(str(tmp_path), "d")
    assert current(ds) is None
    (tmp_path / "d" / "_versions").mkdir(parents=True)
    (tmp_path / "d" / "_versions" / "manifest-000009.json.tmp-1234").write_text("{}")
    (tmp_path / "d" / "_versions" / "notes.txt").write_text("x")
    assert current(ds) is None and ds.versions() == []


def test_a_retried_create_that_finds_its_own_bytes_is_done_and_other_bytes_conflict(tmp_path):
    from dafactory.tasks.io.commit import CommitConflict, _create

    ds = DatasetDir(str(tmp_path), "d")
    _create(ds, "_versions/manifest-000001.json", b'{"v": 1}')
    _create(ds, "_versions/manifest-000001.json", b'{"v": 1}')  # the first PUT landed, its answer was lost
    with pytest.raises(CommitConflict, match="manifest-000001.json"):
        _create(ds, "_versions/manifest-000001.json", b'{"v": 2}')
    assert (tmp_path / "d" / "_versions" / "manifest-000001.json").read_bytes() == b'{"v": 1}'
    assert [p.name for p in (tmp_path / "d" / "_versions").iterdir()] == ["manifest-000001.json"]  # no temp left
