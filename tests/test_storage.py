"""Storage: parts, ownership by config, manifests written last, pruning of stale parts."""

import json

import pyarrow as pa
import pytest

from tasks.errors import UserError
from tasks.schemas import BEST, QUARANTINE, to_table
from tasks.storage import DatasetDir


def qrows(n):
    return [{"prompt_id": f"p{i}", "source_row": i, "prompt": "x", "reason": "empty", "detail": None} for i in range(n)]


def test_parts_are_zstd_parquet_with_the_schema_and_stats(tmp_path):
    ds = DatasetDir(str(tmp_path), "d")
    ds.write_part("quarantine", "a", to_table(qrows(2), QUARANTINE), stats={"k": 1})
    (path,) = ds.parts("quarantine").values()
    meta = ds.footer(path)
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert ds.read_table("quarantine").schema == QUARANTINE
    assert list((tmp_path / "d" / "quarantine").iterdir())[0].name == "part-a.parquet"  # no temp files left
    # rewriting the same part replaces it, never duplicates it
    ds.write_part("quarantine", "a", to_table(qrows(3), QUARANTINE))
    assert ds.row_counts(["quarantine"]) == {"quarantine": {"rows": 3, "parts": 1, "files": ["quarantine/part-a.parquet"]}}


def test_rows_outside_the_schema_fail_loudly():
    with pytest.raises(ValueError, match="outside the schema"):
        to_table([{"prompt": [], "completion": [], "bogus": 1}], BEST)


def test_output_owned_by_another_config_is_refused(tmp_path):
    ds = DatasetDir(str(tmp_path), "d")
    ds.claim("aaaa", {"n": 1})
    ds.check_owner("aaaa")  # same config: fine (resume)
    with pytest.raises(UserError, match="already holds a dataset built with a different config"):
        DatasetDir(str(tmp_path), "d").check_owner("bbbb")


def test_claim_removes_an_old_manifest(tmp_path):
    ds = DatasetDir(str(tmp_path), "d")
    ds.claim("aaaa", {})
    ds.write_manifest({"status": "complete"})
    assert ds.read_manifest() == {"status": "complete"}
    ds.claim("aaaa", {})  # a new run starts: the folder no longer claims completeness
    assert ds.read_manifest() is None
    assert json.loads((tmp_path / "d" / "config.json").read_text())["fingerprint"] == "aaaa"


def test_prune_removes_stale_parts_and_temp_files(tmp_path):
    ds = DatasetDir(str(tmp_path), "d")
    for part in ("keep", "stale"):
        ds.write_part("quarantine", part, to_table(qrows(1), QUARANTINE))
    (tmp_path / "d" / "quarantine" / "part-x.parquet.tmp-1234").write_bytes(b"half")
    assert ds.prune({"keep"}, ["quarantine"]) == 1
    assert sorted(p.name for p in (tmp_path / "d" / "quarantine").iterdir()) == ["part-keep.parquet"]


def test_manifest_is_created_exclusively_and_lists_what_readers_read(tmp_path):
    ds = DatasetDir(str(tmp_path), "d")
    ds.write_part("quarantine", "a", to_table(qrows(2), QUARANTINE))
    counts = ds.row_counts(["quarantine"])
    ds.write_manifest({"status": "complete", "tables": counts})
    with pytest.raises(FileExistsError):
        ds.write_manifest({"status": "complete", "tables": counts})  # a second writer cannot claim it
    # a part written after the manifest (a run in progress) is not part of the dataset
    ds.write_part("quarantine", "b", to_table(qrows(5), QUARANTINE))
    assert ds.read_table("quarantine").num_rows == 2
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["manifest.json", "quarantine"]  # no temp files


def test_reading_parts_never_aborts_the_process_at_exit(tmp_path):
    """pyarrow's threaded read from Python file objects aborted about one process in three at exit
    ('terminate called without an active exception'); reads are single-threaded now."""
    import subprocess
    import sys

    ds = DatasetDir(str(tmp_path), "d")
    for part in "abcd":
        ds.write_part("quarantine", part, to_table(qrows(50), QUARANTINE))
    code = (f"from tasks.storage import DatasetDir; "
            f"assert DatasetDir({str(tmp_path)!r}, 'd').read_table('quarantine').num_rows == 200")
    codes = [subprocess.run([sys.executable, "-c", code], capture_output=True).returncode for _ in range(8)]
    assert codes == [0] * 8
