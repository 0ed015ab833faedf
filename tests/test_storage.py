"""Storage: parts written once under their final names, ownership by config, reads of what a version lists."""

import json
import shutil

import pytest

from dafactory.tasks.errors import UserError
from dafactory.tasks.io.commit import commit
from dafactory.tasks.io.schemas import BEST, QUARANTINE, to_table
from dafactory.tasks.io.storage import DatasetDir


def qrows(n):
    return [{"prompt_id": f"p{i}", "source_row": i, "prompt": "x", "reason": "empty", "detail": None} for i in range(n)]


def test_parts_are_zstd_parquet_with_the_schema_and_stats(tmp_path):
    ds = DatasetDir(str(tmp_path), "d")
    ds.write_part("quarantine", "a@t1", to_table(qrows(2), QUARANTINE), stats={"k": 1})
    assert list(ds.parts("quarantine")) == ["a@t1"]  # written where it stays, under its final name
    (path,) = ds.parts("quarantine").values()
    meta = ds.footer(path)
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert ds.marker_stats([path]) == [{"k": 1}]
    assert ds.read_part("quarantine", "a@t1").schema == QUARANTINE
    assert [p.name for p in (tmp_path / "d" / "quarantine").iterdir()] == ["part-a@t1.parquet"]  # no temp files left
    # a keyed part of the same content is the same name, and is not written again when listed already
    name = ds.write_keyed("quarantine", "input", to_table(qrows(3), QUARANTINE))
    mtime = (tmp_path / "d" / "quarantine" / f"part-{name}.parquet").stat().st_mtime_ns
    assert ds.write_keyed("quarantine", "input", to_table(qrows(3), QUARANTINE), set(ds.parts("quarantine"))) == name
    assert (tmp_path / "d" / "quarantine" / f"part-{name}.parquet").stat().st_mtime_ns == mtime


def test_rows_outside_the_schema_fail_loudly():
    with pytest.raises(ValueError, match="outside the schema"):
        to_table([{"prompt": [], "completion": [], "bogus": 1}], BEST)


def test_output_owned_by_another_config_is_refused(tmp_path):
    ds = DatasetDir(str(tmp_path), "d")
    ds.claim("aaaa", {"n": 1})
    ds.check_owner("aaaa")  # same config: fine (resume)
    with pytest.raises(UserError, match="already holds a dataset built with a different config"):
        DatasetDir(str(tmp_path), "d").check_owner("bbbb")


def test_claim_keeps_the_last_version(tmp_path):
    ds = DatasetDir(str(tmp_path), "d")
    ds.claim("aaaa", {})
    commit(ds, lambda current: {"status": "complete", "tables": {}})
    ds.claim("aaaa", {})  # a new run starts: readers keep the committed version until it commits
    assert ds.read_manifest()["version"] == 1
    assert json.loads((tmp_path / "d" / "config.json").read_text())["fingerprint"] == "aaaa"


def test_reading_parts_never_aborts_the_process_at_exit(tmp_path):
    """pyarrow's threaded read from Python file objects aborted about one process in three at exit
    ('terminate called without an active exception'); reads are single-threaded now."""
    import subprocess
    import sys

    ds = DatasetDir(str(tmp_path), "d")
    files = []
    for part in "abcd":
        ds.write_part("quarantine", part, to_table(qrows(50), QUARANTINE))
        files.append(f"quarantine/part-{part}.parquet")
    commit(ds, lambda current: {"tables": {"quarantine": {"rows": 200, "files": files}}})
    code = (f"from dafactory.tasks.io.storage import DatasetDir; "
            f"assert DatasetDir({str(tmp_path)!r}, 'd').read_table('quarantine').num_rows == 200")
    codes = [subprocess.run([sys.executable, "-c", code], capture_output=True).returncode for _ in range(8)]
    assert codes == [0] * 8


def test_a_manifest_naming_files_outside_the_dataset_is_refused(tmp_path):
    (tmp_path / "secret.parquet").write_bytes(b"not yours")
    ds = DatasetDir(str(tmp_path), "d")
    commit(ds, lambda current: {"tables": {"quarantine": {"rows": 0, "files": ["../secret.parquet"]}}})
    with pytest.raises(UserError, match="outside the dataset: '../secret.parquet'"):
        ds.read_table("quarantine")


def test_a_store_that_stays_down_fails_cleanly_after_backoff(tmp_path, monkeypatch):
    from dafactory.tasks.errors import StorageError

    ds = DatasetDir(str(tmp_path), "d", retries=2, backoff_s=0.01)
    calls = []

    def down(*args, **kwargs):
        calls.append(1)
        raise ConnectionError("Could not connect to the endpoint URL\nmore")

    monkeypatch.setattr(ds, "_put_once", down)
    with pytest.raises(StorageError) as err:
        ds.write_part("quarantine", "a", to_table(qrows(1), QUARANTINE))
    assert str(err.value) == (f"storage {ds.uri} failed to write quarantine/part-a.parquet after 3 "
                              "attempts: Could not connect to the endpoint URL")
    assert len(calls) == 3
    monkeypatch.undo()  # the store is back: the same write goes through
    ds.write_part("quarantine", "a", to_table(qrows(1), QUARANTINE))
    assert list(ds.parts("quarantine")) == ["a"]


def shard_result(shard_id="s1"):
    """What a last stage hands the writer for one shard: every table, counts and timings."""
    return {"shard_id": shard_id, "shard_index": 0, "prompts": 2, "outcomes": {}, "seconds": {"score": 0.1},
            "work": {"score": {"busy_s": 0.2, "samples": 0}},
            "tables": {"quarantine": to_table(qrows(1), QUARANTINE), "best": to_table([], BEST)}}


def test_a_first_stage_replica_reads_its_shard_where_it_sees_the_folder(tmp_path):
    from dafactory.tasks.io.prompts import PromptRow, Shard
    from dafactory.tasks.io.schemas import PROMPTS
    from dafactory.tasks.io.storage import ShardReader, ShardRef

    ds = DatasetDir(str(tmp_path), "d")
    rows = [
        {"prompt_id": "a1", "source_row": 4, "prompt": "how do I bake bread?", "category": "benign",
         "categories": ["benign"], "reference": None, "shard_id": "s7"},
        {"prompt_id": "b2", "source_row": 9, "prompt": "what is 2+2?", "category": "math; benign",
         "categories": ["math", "benign"], "reference": '["number", "4", 0]', "shard_id": "s7"},
    ]
    reader = ShardReader(ds)
    ref = ShardRef("s7", 3, 2, "s7@abc")
    assert reader.in_replica(ref) is None  # not this node's folder: the driver reads it
    ds.claim("f", {})
    ref = ShardRef("s7", 3, 2, ds.write_keyed("prompts", "s7", to_table(rows, PROMPTS)))
    assert reader.in_replica(ref) == Shard("s7", 3, (
        PromptRow("a1", "how do I bake bread?", "benign", 4, ("benign",), None),
        PromptRow("b2", "what is 2+2?", "math; benign", 9, ("math", "benign"), ("number", "4", 0)),
    ))


def test_a_replica_writes_its_shard_where_it_sees_the_folder_and_hands_it_back_otherwise(tmp_path):
    from dafactory.tasks.io.storage import ShardWriter

    ds = DatasetDir(str(tmp_path), "d")
    writer = ShardWriter(ds, ("quarantine", "best"), ("best",))
    # cases: (folder claimed on this node's disk?, what the replica returns)
    back = writer.in_replica(shard_result())
    assert back["unwritten"] == f"{ds.uri} is not on this node's disk" and back["tables"]  # the rows go back
    assert ds.parts("best") == {}
    ds.claim("f", {})
    back = writer.in_replica(shard_result())
    part = back["written"]["part"]
    assert part.startswith("s1@") and len(part) == len("s1@") + 12  # one token for the shard's parts
    assert back == {"written": {"shard_id": "s1", "shard_index": 0, "prompts": 2, "prompts_out": 0,
                                "rows": {"quarantine": 1, "best": 0}, "quarantined": {"empty": 1}, "outcomes": {},
                                "candidates": {}, "errors": {}, "first_error": None, "seconds": {"score": 0.1},
                                "work": {"score": {"busy_s": 0.2, "samples": 0}}, "spans": {}, "part": part}}
    assert set(ds.parts("best")) == set(ds.parts("quarantine")) == {part}
    assert ds.marker_stats([ds.part_path("best", part)]) == [back["written"]]  # the marker carries the stats
    # the same shard written again (a retry) gets its own name: nothing is overwritten
    again = writer.in_replica(shard_result())["written"]["part"]
    assert again != part and set(ds.parts("best")) == {part, again}
    # a store that refuses the write: the rows go back with the reason, for the driver to write
    shutil.rmtree(tmp_path / "d" / "best")
    (tmp_path / "d" / "best").write_text("a file where a folder must be")
    broken = ShardWriter(DatasetDir(str(tmp_path), "d", retries=0), ("quarantine", "best"), ("best",))
    back = broken.in_replica(shard_result("s2"))
    assert "unwritten" in back and back["shard_id"] == "s2" and back["tables"]


def test_parts_written_before_a_column_was_added_read_and_compact_beside_new_ones(tmp_path):
    # a prompts part of a folder planned before max_new_tokens existed, and one planned after: read one at a time,
    # together and compacted, the old part's rows have the new column as nulls
    import pyarrow as pa

    from dafactory.tasks.io.compact import write_group
    from dafactory.tasks.io.schemas import PROMPTS
    from dafactory.tasks.io.storage import ShardRef, load_shard, write_parquet

    def rows(pid, budget):
        return {"prompt_id": pid, "source_row": 0, "prompt": f"text {pid}", "category": None, "categories": [],
                "reference": None, "max_new_tokens": budget, "shard_id": f"s{pid}"}

    ds = DatasetDir(str(tmp_path), "d")
    old_schema = pa.schema([f for f in PROMPTS if f.name != "max_new_tokens"])
    old = pa.Table.from_pylist([{k: v for k, v in rows("a", None).items() if k != "max_new_tokens"}], old_schema)
    ds._put(ds.part_path("prompts", "sa@old"), lambda f: write_parquet(old, f))
    new = ds.write_keyed("prompts", "sb", to_table([rows("b", 16)], PROMPTS))
    assert ds.read_part("prompts", "sa@old").to_pylist() == [rows("a", None)]
    assert ds.read_parts("prompts", {"sa@old", new}).to_pylist() == [rows("a", None), rows("b", 16)]
    assert load_shard(ds, ShardRef("sa", 0, 1, "sa@old")).rows[0].max_new_tokens is None
    assert load_shard(ds, ShardRef("sb", 1, 1, new)).rows[0].max_new_tokens == 16
    write_group(ds, "prompts", "prompts/compact-x.parquet", ["prompts/part-sa@old.parquet", f"prompts/part-{new}.parquet"])
    assert ds.read_file(ds._inside("prompts/compact-x.parquet")).to_pylist() == [rows("a", None), rows("b", 16)]
