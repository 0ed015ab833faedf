"""Pure core: loading, validating, deduplicating and sharding prompts."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dafactory.tasks.config import PromptSource
from dafactory.tasks.errors import UserError
from dafactory.tasks.io.prompts import iter_prompts, load_prompts, merge, prompt_id
from tests.conftest import write_jsonl

BAD_BYTES = b"caf\xe9 au lait"  # Latin-1, not UTF-8


def test_prompt_id_is_a_content_hash():
    # the same text gives the same id wherever it appears; any change gives another id
    assert prompt_id("hello") == prompt_id("hello") == "2cf24dba5fb0a30e"
    assert prompt_id("hello ") != prompt_id("hello")


def test_csv_quarantines_bad_rows_and_dedups(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(
        b"text,cat\n"
        b"how do I bake bread,benign\n"  # kept
        b"   ,benign\n"  # whitespace only -> empty
        b"\"\",benign\n"  # empty string -> empty
        + b'"' + BAD_BYTES + b'",benign\n'  # bad bytes -> non_utf8
        b"how do I bake bread,benign\n"  # duplicate of row 0
        b"\"multi\nline prompt\",harm\n"  # quoted newline is part of the prompt
    )
    ps = load_prompts(PromptSource(path=str(path), prompt_column="text", category_column="cat"))
    assert [(r.prompt, r.category, r.source_row) for r in ps.rows] == [
        ("how do I bake bread", "benign", 0),
        ("multi\nline prompt", "harm", 5),
    ]
    assert [(q["source_row"], q["reason"]) for q in ps.quarantine] == [
        (1, "empty"), (2, "empty"), (3, "non_utf8"), (4, "duplicate")
    ]
    assert ps.duplicates == 1
    assert ps.source_rows == 6


def test_jsonl_bad_lines_are_quarantined(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(
        b'{"prompt": "first"}\n'
        b'{"prompt": "' + BAD_BYTES + b'"}\n'  # -> non_utf8
        b"{not json}\n"  # -> malformed_json
        b'{"prompt": 42}\n'  # -> not_text
        b'{"other": "x"}\n'  # no prompt key -> empty (missing value)
        b"\n"  # blank lines are not rows
        b'{"prompt": "second"}\n'
    )
    ps = load_prompts(PromptSource(path=str(path)))
    assert [r.prompt for r in ps.rows] == ["first", "second"]
    assert [q["reason"] for q in ps.quarantine] == ["non_utf8", "malformed_json", "not_text", "empty"]


def test_parquet_binary_column_and_limit(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"q": pa.array([b"ok one", BAD_BYTES, b"ok two", b"ok three"], pa.binary())}), path)
    ps = load_prompts(PromptSource(path=str(path), prompt_column="q", limit=3))
    assert [r.prompt for r in ps.rows] == ["ok one", "ok two"]
    assert [q["reason"] for q in ps.quarantine] == ["non_utf8"]
    assert ps.source_rows == 3


@pytest.mark.parametrize(
    "source, message",
    [
        # the file does not exist
        (dict(path="/nonexistent/p.jsonl"), "prompt file not found: /nonexistent/p.jsonl"),
        # unknown extension
        (dict(path="__TMP__/p.txt"), "unsupported format"),
        # wrong column: the error names the columns that exist
        (dict(path="__TMP__/p.jsonl", prompt_column="text"), "missing column(s) 'text'; columns present: 'prompt', 'category'"),
        (dict(path="__TMP__/p.jsonl", category_column="cat"), "missing column(s) 'cat'"),
    ],
)
def test_bad_sources_fail_with_one_line(tmp_path, source, message):
    (tmp_path / "p.txt").write_text("x")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a", "category": "b"}\n')
    source = {k: v.replace("__TMP__", str(tmp_path)) if isinstance(v, str) else v for k, v in source.items()}
    with pytest.raises(UserError) as err:
        load_prompts(PromptSource(**source))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


TAKEN = "same text as an earlier row, which takes its categories"
PLAIN = "same text as an earlier row"


@pytest.mark.parametrize("batch_rows", [1, 2, 8192])  # the first row and its repeat in one batch, or not
@pytest.mark.parametrize(
    "rows, kept, duplicates",
    [
        # a repeat with another category: the first row carries both, in file order
        ([("a", "harm"), ("b", "benign"), ("a", "violence")],
         [(0, "a", ("harm", "violence")), (1, "b", ("benign",))], [(2, TAKEN)]),
        # the same category twice is one category
        ([("a", "harm"), ("a", "harm")], [(0, "a", ("harm",))], [(1, TAKEN)]),
        # lists of categories (STAR-41K style) merge as sets, stripped, first seen first
        ([("a", ["harm", "fraud"]), ("a", [" fraud ", "privacy"])], [(0, "a", ("harm", "fraud", "privacy"))],
         [(1, TAKEN)]),
        # a first row without a category takes its repeat's
        ([("a", None), ("a", "harm")], [(0, "a", ("harm",))], [(1, TAKEN)]),
        # a repeat without a category brings nothing
        ([("a", "harm"), ("a", None)], [(0, "a", ("harm",))], [(1, PLAIN)]),
        # quarantined rows between them change nothing; three rows of one prompt give three categories
        ([("a", "harm"), ("  ", "x"), ("a", "violence"), ("a", "fraud")], [(0, "a", ("harm", "violence", "fraud"))],
         [(2, TAKEN), (3, TAKEN)]),
    ],
)
def test_a_repeated_prompt_keeps_every_category(tmp_path, rows, kept, duplicates, batch_rows):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "category": c} for p, c in rows])
    ps = merge(iter_prompts(PromptSource(path=str(path), category_column="category"), batch_rows=batch_rows))
    assert [(r.source_row, r.prompt, r.categories) for r in ps.rows] == kept
    assert [r.category for r in ps.rows] == ["; ".join(c) for _, _, c in kept]  # the one-string column too
    # every source row is still accounted once: the repeats stay quarantined
    assert [(q["source_row"], q["detail"]) for q in ps.quarantine if q["reason"] == "duplicate"] == duplicates
    assert ps.duplicates == len(duplicates) and ps.source_rows == len(rows)


def test_bundled_sample():
    ps = load_prompts(PromptSource(path="sample", category_column="category"))
    assert len(ps.rows) == 16 and not ps.quarantine and ps.duplicates == 0
    assert sum(r.category == "benign" for r in ps.rows) == 8


def test_a_file_named_parquet_that_is_not_parquet_is_one_line(tmp_path):
    path = tmp_path / "p.parquet"
    path.write_text('{"prompt": "hello"}\n')
    with pytest.raises(UserError, match=r"p.parquet: not a readable Parquet file \(.*magic bytes") as err:
        load_prompts(PromptSource(path=str(path)))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("batch_rows", [1, 8192])
@pytest.mark.parametrize(
    "rows",
    [
        [("a", "harm"), ("b", "benign"), ("a", "violence")],
        [("a", ["harm", "fraud"]), ("a", [" fraud ", "privacy"])],
        [("a", None), ("a", "harm")],
        [("a", "harm"), ("  ", "x"), ("a", "violence"), ("a", "fraud"), ("b", None)],
    ],
)
def test_the_planner_reads_the_input_once_and_still_keeps_every_category(tmp_path, rows, batch_rows):
    """Planning without a screen reads the file once: categories that repeats bring are added when the
    spill files are read back. The planned prompts equal the two-pass reading's rows."""
    from dafactory.tasks.io.storage import DatasetDir
    from dafactory.tasks.run.planner import Planner

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "category": c} for p, c in rows])
    src = PromptSource(path=str(path), category_column="category")
    two_pass = merge(iter_prompts(src, batch_rows=batch_rows))
    ds = DatasetDir(str(tmp_path / "out"), "d")
    planner = Planner(ds, shard_size=64, salt="s")
    for batch in iter_prompts(src, batch_rows=batch_rows, late=planner.late):
        planner.add(batch)
    plan = planner.finish()
    planned = {r["prompt_id"]: r for ref in plan.shards for r in ds.read_part("prompts", ref.part).to_pylist()}
    assert {pid: (r["category"], tuple(r["categories"])) for pid, r in planned.items()} == {
        r.prompt_id: (r.category, r.categories) for r in two_pass.rows}


def test_each_row_may_bound_its_own_new_tokens_in_every_format(tmp_path):
    # max_new_tokens_column: a whole number >= 1 per row (an empty cell: the config's); a bad cell quarantines
    # its row with the reason, and that row takes no part in dedup (a later good row of the same text is kept)
    jsonl = tmp_path / "p.jsonl"
    write_jsonl(jsonl, [{"prompt": "a", "budget": 16}, {"prompt": "b", "budget": None}, {"prompt": "c", "budget": 0},
                        {"prompt": "d", "budget": "many"}, {"prompt": "e", "budget": 2.5}, {"prompt": "f"},
                        {"prompt": "c", "budget": 7}, {"prompt": "g", "budget": True}, {"prompt": "h", "budget": 3.0}])
    csv = tmp_path / "p.csv"
    csv.write_bytes(b"prompt,budget\na,16\nb,\nc,0\nd,many\ne,2.5\nf, 5 \nc,7\n")
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c", "d"], "budget": pa.array([16, None, -1, 256], pa.int32())}),
                   parquet)
    got = {}
    for path in (jsonl, csv, parquet):
        ps = load_prompts(PromptSource(path=str(path), max_new_tokens_column="budget"))
        got[path.suffix] = ([(r.prompt, r.source_row, r.max_new_tokens) for r in ps.rows],
                            [(q["source_row"], q["prompt"], q["reason"], q["detail"]) for q in ps.quarantine])
    bad = "bad_max_new_tokens"
    assert got[".jsonl"] == (
        [("a", 0, 16), ("b", 1, None), ("f", 5, None), ("c", 6, 7), ("h", 8, 3)],
        [(2, "c", bad, "max_new_tokens: 0 is below 1"), (3, "d", bad, "max_new_tokens: 'many' is not a whole number"),
         (4, "e", bad, "max_new_tokens: '2.5' is not a whole number"),
         (7, "g", bad, "max_new_tokens: 'True' is not a whole number")])
    assert got[".csv"] == (
        [("a", 0, 16), ("b", 1, None), ("f", 5, 5), ("c", 6, 7)],
        [(2, "c", bad, "max_new_tokens: 0 is below 1"), (3, "d", bad, "max_new_tokens: 'many' is not a whole number"),
         (4, "e", bad, "max_new_tokens: '2.5' is not a whole number")])
    assert got[".parquet"] == ([("a", 0, 16), ("b", 1, None), ("d", 3, 256)],
                               [(2, "c", bad, "max_new_tokens: -1 is below 1")])
    # a string column of budgets with a cell that is not UTF-8 (not every writer checks): that row alone
    strings = tmp_path / "s.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "budget": pa.array([b"12", BAD_BYTES], pa.binary())}).cast(
        pa.schema([("prompt", pa.string()), ("budget", pa.string())]), safe=False), strings)
    ps = load_prompts(PromptSource(path=str(strings), max_new_tokens_column="budget"))
    assert [(r.prompt, r.max_new_tokens) for r in ps.rows] == [("a", 12)]
    assert [(q["prompt"], q["detail"]) for q in ps.quarantine] == [("b", "max_new_tokens: not UTF-8")]
    # a column named and missing is the usual one-line error
    with pytest.raises(UserError, match="missing column\\(s\\) 'tokens'"):
        load_prompts(PromptSource(path=str(jsonl), max_new_tokens_column="tokens"))
