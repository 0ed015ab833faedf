"""Property tests of prompt loading over hostile files: every source row ends in exactly one place (a
PromptRow or a quarantine row with a reason), valid text comes back unchanged, and batch boundaries
do not matter. Then one nasty file through the whole preference flow on the fake backend."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dafactory.tasks.config import PreferenceConfig, PromptSource, build_config
from dafactory.tasks.errors import UserError
from dafactory.tasks.io.prompts import iter_prompts, merge, prompt_id
from dafactory.tasks.io.storage import DatasetDir
from dafactory.tasks.io.verify import verify

REASONS = {"empty", "non_utf8", "malformed_json", "not_text", "duplicate"}
BATCHES = (1, 3, 8192)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                      HealthCheck.data_too_large])

# Pieces that break naive code: control characters, line and paragraph separators, RTL and bidi
# overrides, zero-width characters, a BOM inside text, astral characters and ZWJ sequences, CSV and
# JSON syntax, and Unicode whitespace that str.strip() removes.
NASTY = ["\x00", "\r", "\n", "\r\n", "\t", "\x1b[31m", "\x7f", "\x85", "\xa0", "\u2028", "\u2029", "\u200b",
         "\u200d", "\u200f", "\u202e", "\ufeff", "\u3000", "مرحبا", "שלום", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "😀", "👩\u200d👩\u200d👧",
         "\U0010fffd", " ", ",", ";", '"', "'", '""', "\\", "\\u0000", "{", "}", "[", "]", "null", "NA", "#"]
BAD_BYTES = [b"caf\xe9",  # Latin-1
             b"\xff", b"\xfe\xff",  # never valid in UTF-8
             b"\xc3", b"\xe2\x82", b"\xf0\x9f\x98",  # multibyte sequences cut short
             b"\xed\xa0\x80",  # a UTF-16 surrogate encoded as UTF-8
             b"\xc0\xaf"]  # overlong encoding of "/"

TEXT = st.lists(st.one_of(st.text(st.characters(codec="utf-8"), max_size=12), st.sampled_from(NASTY)),
                max_size=6).map("".join)
BLANK = st.sampled_from(["", " ", "\t", "\r\n", "\u2028", "\u3000 \xa0"])  # str.strip() leaves nothing
HUGE = st.sampled_from(["a", "é", "😀", "\u202e", "x\x00"]).map(lambda c: c * (200_000 // len(c)))
PROMPT = st.one_of(TEXT, TEXT, TEXT, BLANK, HUGE)


@dataclass
class Row:
    """One line of a generated file and what loading it must give."""

    data: bytes
    text: str | None = None  # a valid prompt: it must come back exactly
    reason: str | None = None  # else the quarantine reason; neither: not a row at all (a blank line)
    cats: tuple = ()
    keys: tuple = ()  # JSONL: the keys of the object on this line


def text_row(data: bytes, text: str, cats: tuple = (), keys: tuple = ()) -> Row:
    if not text.strip():
        return Row(data, reason="empty", keys=keys)
    return Row(data, text=text, cats=cats, keys=keys)


def category(raw) -> tuple:
    items = raw if isinstance(raw, list) else [raw]
    return tuple(dict.fromkeys(i.strip() for i in items if isinstance(i, str) and i.strip()))


def expected(rows: list[Row], limit: int | None = None):
    """(rows as (source_row, prompt, categories), quarantine as (source_row, reason), source_rows) of the
    first `limit` source rows. A repeated prompt's categories join its first row's."""
    out, quarantine, first, i = [], [], {}, 0
    for r in rows:
        if r.text is None and r.reason is None:
            continue
        if i == limit:
            break
        if r.reason is not None:
            quarantine.append((i, r.reason))
        elif r.text in first:
            quarantine.append((i, "duplicate"))
            j = first[r.text]
            out[j] = (*out[j][:2], tuple(dict.fromkeys(out[j][2] + r.cats)))
        else:
            first[r.text] = len(out)
            out.append((i, r.text, r.cats))
        i += 1
    return out, quarantine, i


def load(path: str, batch_rows: int, **kw):
    batches = list(iter_prompts(PromptSource(path=path, **kw), batch_rows=batch_rows))
    assert all(b.source_rows <= batch_rows for b in batches)  # the documented batch size holds
    return merge(batches)


def check_accounting(ps) -> None:
    assert ps.source_rows == len(ps.rows) + len(ps.quarantine)
    assert sorted([r.source_row for r in ps.rows] + [q["source_row"] for q in ps.quarantine]) == list(
        range(ps.source_rows))
    assert len({r.prompt_id for r in ps.rows}) == len(ps.rows)
    for r in ps.rows:
        assert isinstance(r.prompt, str) and r.prompt.strip() and r.prompt_id == prompt_id(r.prompt)
    for q in ps.quarantine:
        assert q["reason"] in REASONS and isinstance(q["detail"], str) and q["detail"]
    assert ps.duplicates == sum(q["reason"] == "duplicate" for q in ps.quarantine)


def check_file(path: str, rows: list[Row], **kw) -> None:
    """The same merged result for every batch size, equal to what the rows say; and `limit` is the same
    as a file cut after `limit` rows (a repeat past the limit brings no category)."""

    def want(limit=None):
        out, quarantine, n = expected(rows, limit)
        if not kw.get("category_column"):
            out = [(i, text, ()) for i, text, _ in out]
        return out, quarantine, n

    want_rows, want_quarantine, n = want()
    results = [load(path, k, **kw) for k in BATCHES]
    for ps in results:
        check_accounting(ps)
        assert ps.source_rows == n
        assert [(r.source_row, r.prompt, r.categories) for r in ps.rows] == want_rows
        assert [(q["source_row"], q["reason"]) for q in ps.quarantine] == want_quarantine
        assert ps.rows == results[0].rows and ps.quarantine == results[0].quarantine
    if n > 1:
        limit = n // 2
        cut_rows, cut_quarantine, _ = want(limit)
        for k in (1, 3):
            ps = load(path, k, limit=limit, **kw)
            check_accounting(ps)
            assert ps.source_rows == limit
            assert [(r.source_row, r.prompt, r.categories) for r in ps.rows] == cut_rows
            assert [(q["source_row"], q["reason"]) for q in ps.quarantine] == cut_quarantine
            assert [r.prompt_id for r in ps.rows] == [r.prompt_id for r in results[0].rows if r.source_row < limit]


def write(data: bytes, suffix: str) -> str:
    fd, path = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


# ---------------------------------------------------------------------------------------------- JSONL

SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True))
NESTED = st.recursive(st.one_of(SCALAR, TEXT), lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)), max_leaves=8)
CATEGORY = st.one_of(st.none(), TEXT, st.integers(), st.lists(st.one_of(TEXT, st.integers(), st.none()), max_size=3))


@st.composite
def jsonl_row(draw, pool: list[str]) -> Row:
    kind = draw(st.sampled_from(["text", "text", "text", "dup", "value", "missing", "surrogate", "bad_bytes",
                                 "truncated", "garbage", "not_object", "deep", "bigint", "blank"]))
    dumps = lambda obj: json.dumps(obj, ensure_ascii=draw(st.booleans())).encode()  # noqa: E731
    if kind in ("text", "dup"):
        text = draw(st.sampled_from(pool)) if kind == "dup" else draw(PROMPT)
        obj = {"prompt": text}
        if draw(st.booleans()):
            obj["category"] = draw(CATEGORY)
        return text_row(dumps(obj), text, category(obj.get("category")), tuple(obj))
    if kind == "value":  # a prompt that is not a string: null is a missing value, the rest not text
        value = draw(st.one_of(SCALAR, NESTED.filter(lambda v: not isinstance(v, str))))
        return Row(dumps({"prompt": value}), reason="empty" if value is None else "not_text", keys=("prompt",))
    if kind == "missing":
        return Row(dumps({"text": draw(TEXT)}), reason="empty", keys=("text",))
    if kind == "surrogate":  # valid JSON, but "\ud800" decodes to a lone surrogate: no UTF-8 for it
        text = draw(TEXT) + draw(st.sampled_from(["\ud800", "\udfff", "\udc80"])) + draw(TEXT)
        return Row(json.dumps({"prompt": text}).encode(), reason="non_utf8", keys=("prompt",))
    if kind == "bad_bytes":
        data = b'{"prompt": ' + json.dumps(draw(TEXT)).encode()[:-1] + draw(st.sampled_from(BAD_BYTES)) + b'"}'
        return Row(data, reason="non_utf8")
    if kind == "truncated":  # an object without its closing brace
        return Row(dumps({"prompt": draw(TEXT)})[:-1], reason="malformed_json")
    if kind == "garbage":
        data = draw(st.sampled_from([b"{not json}", b"{'prompt': 'single quotes'}", b'{"prompt": "x",}',
                                     b"prompt,category", b'{"prompt": "raw \x1b escape"}', b'{"prompt": "a\tb"}',
                                     b'{"prompt": "x"} trailing', b"\x00", b"\xef\xbb\xbf"]))
        return Row(data, reason="malformed_json")
    if kind == "not_object":  # valid JSON, but not an object
        return Row(dumps(draw(st.one_of(SCALAR, TEXT, st.lists(NESTED, max_size=3)))), reason="malformed_json")
    if kind == "deep":  # nested past the parser's recursion limit
        return Row(b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", reason="malformed_json")
    if kind == "bigint":  # past Python's int digit limit
        return Row(b'{"prompt": 1' + b"0" * 5000 + b"}", reason="malformed_json")
    return Row(draw(st.sampled_from([b"", b" ", b"\t", b"\r", b" \t \r"])))  # blank: not a row


@st.composite
def jsonl_file(draw):
    pool = draw(st.lists(PROMPT, min_size=1, max_size=4))
    rows = draw(st.lists(jsonl_row(pool), min_size=1, max_size=12))
    rows.append(text_row(b'{"prompt": "anchor"}', "anchor", keys=("prompt",)))  # the column exists
    rows = draw(st.permutations(rows))
    endings = draw(st.lists(st.sampled_from([b"\n", b"\r\n"]), min_size=len(rows), max_size=len(rows)))
    data = b"".join(r.data + e for r, e in zip(rows, endings))
    if draw(st.booleans()):
        data = data[: -len(endings[-1])]  # no newline at the end
    if draw(st.booleans()) and rows[0].text is not None:
        data = b"\xef\xbb\xbf" + data  # a UTF-8 BOM at the start of the file
    return data, rows


@settings(max_examples=60, **SETTINGS)
@given(jsonl_file())
def test_jsonl_every_row_accounted_for(file):
    data, rows = file
    path = write(data, ".jsonl")
    try:
        check_file(path, rows)
        if any("category" in r.keys for r in rows):
            check_file(path, rows, category_column="category")
    finally:
        os.unlink(path)


@settings(max_examples=40, **SETTINGS)
@given(st.lists(st.one_of(st.binary(max_size=24), st.sampled_from([b'{"prompt": "ok"}', b'{"prompt": 1}'])),
                min_size=1, max_size=10).map(lambda lines: [x.replace(b"\n", b"") for x in lines]))
def test_jsonl_random_bytes_never_crash(lines):
    path = write(b"\n".join(lines), ".jsonl")

    def has_prompt(line):
        try:
            obj = json.loads(line)
            return isinstance(obj, dict) and "prompt" in obj
        except Exception:
            return False

    try:
        results = []
        for k in BATCHES:
            try:
                results.append(load(path, k))
            except UserError as exc:  # only when no line is an object with the column
                assert "missing column(s) 'prompt'" in str(exc) and not any(map(has_prompt, lines))
                results.append(None)
        for ps in results:
            assert (ps is None) == (results[0] is None)
            if ps is not None:
                check_accounting(ps)
                assert ps.source_rows == sum(bool(x.strip()) for x in lines)
                assert (ps.rows, ps.quarantine) == (results[0].rows, results[0].quarantine)
    finally:
        os.unlink(path)


# -------------------------------------------------------------------------------------------- CSV, TSV


@st.composite
def csv_cell(draw, pool: list[str]) -> tuple[bytes, str | None, str | None]:
    """(cell bytes, text, reason)."""
    kind = draw(st.sampled_from(["text", "text", "dup", "bad_bytes"]))
    if kind == "bad_bytes":
        pieces = draw(st.lists(st.one_of(TEXT.map(str.encode), st.sampled_from(BAD_BYTES)), min_size=1, max_size=4))
        cell = b"".join(pieces)
        try:
            text = cell.decode("utf-8")  # the pieces happened to be all valid text
        except UnicodeDecodeError:
            return cell, None, "non_utf8"
    else:
        text = draw(st.sampled_from(pool)) if kind == "dup" else draw(PROMPT)
    return text.encode(), text, None


@st.composite
def csv_file(draw, delimiter: bytes):
    pool = draw(st.lists(PROMPT, min_size=1, max_size=4))
    columns = draw(st.permutations(draw(st.sampled_from([["prompt"], ["prompt", "category"],
                                                         ["prompt", "category", "id"]]))))
    quote_all = draw(st.booleans())

    def quote(cell: bytes) -> bytes:
        special = any(c in cell for c in (delimiter, b'"', b"\r", b"\n")) or (not cell and len(columns) == 1)
        return b'"' + cell.replace(b'"', b'""') + b'"' if quote_all or special else cell

    ending = draw(st.sampled_from([b"\n", b"\r\n"]))
    lines, rows = [delimiter.join(c.encode() for c in columns)], []
    for _ in range(draw(st.integers(0, 10))):
        if draw(st.integers(0, 9)) == 0:
            lines.append(b"")  # an empty line: not a row
            rows.append(Row(b""))
            continue
        cell, text, reason = draw(csv_cell(pool))
        cat_cell, cat_text, _ = draw(csv_cell(pool))
        cells = {"prompt": cell, "category": cat_cell, "id": str(len(rows)).encode()}
        lines.append(delimiter.join(quote(cells[c]) for c in columns))
        cats = (cat_text.strip(),) if cat_text is not None and cat_text.strip() and "category" in columns else ()
        rows.append(Row(cell, reason=reason) if reason else text_row(cell, text, cats))
    data = ending.join(lines) + (ending if draw(st.booleans()) else b"")
    if draw(st.booleans()):
        data = b"\xef\xbb\xbf" + data
    return data, rows, "category" in columns


@settings(max_examples=40, **SETTINGS)
@given(st.sampled_from([(b",", ".csv"), (b"\t", ".tsv")]).flatmap(
    lambda d: st.tuples(st.just(d[1]), csv_file(d[0]))))
def test_csv_every_row_accounted_for(case):
    suffix, (data, rows, has_category) = case
    path = write(data, suffix)
    try:
        check_file(path, rows)
        if has_category:
            check_file(path, rows, category_column="category")
    finally:
        os.unlink(path)


@settings(max_examples=30, **SETTINGS)
@given(st.lists(st.binary(max_size=24), max_size=8))
def test_csv_random_bytes_never_crash(lines):
    path = write(b"prompt\n" + b"\n".join(lines), ".csv")
    try:
        outcomes = []
        for k in BATCHES:
            try:
                ps = load(path, k)
            except UserError as exc:  # a row with another number of fields: the CSV itself is broken
                assert "\n" not in str(exc) and "CSV parse error" in str(exc)
                outcomes.append(None)
                continue
            check_accounting(ps)
            outcomes.append((ps.rows, ps.quarantine))
        assert outcomes.count(outcomes[0]) == len(outcomes)
    finally:
        os.unlink(path)


@pytest.mark.parametrize("data, message", [
    (b"prompt,category\nhello\n", "Expected 2 columns, got 1"),  # a short row
    (b'prompt\n"a",b\n', "Expected 1 columns, got 2"),  # an unquoted delimiter
    (b"", "Empty CSV file"),  # not even a header
    (b"text\nhello\n", "missing column(s) 'prompt'; columns present: 'text'"),
    (b"text\n", "missing column(s) 'prompt'"),  # only a header
])
def test_broken_csv_is_a_user_error_in_one_line(tmp_path, data, message):
    (tmp_path / "p.csv").write_bytes(data)
    for k in BATCHES:
        with pytest.raises(UserError) as err:
            load(str(tmp_path / "p.csv"), k)
        assert message in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- Parquet

OPT_TEXT = st.one_of(st.none(), PROMPT)


@st.composite
def parquet_column(draw):
    """(arrow column, rows)."""
    pool = draw(st.lists(PROMPT, min_size=1, max_size=4))
    kind = draw(st.sampled_from(["string", "large_string", "dictionary", "binary", "binary", "bad_string",
                                 "bad_string", "int", "float",
                                 "bool", "list", "struct", "null"]))
    n = draw(st.integers(1, 10))
    if kind in ("string", "large_string", "dictionary"):
        values = draw(st.lists(st.one_of(OPT_TEXT, st.sampled_from(pool)), min_size=n, max_size=n))
        arr = pa.array(values, pa.large_string() if kind == "large_string" else pa.string())
        rows = [Row(b"", reason="empty") if v is None else text_row(b"", v) for v in values]
        return (arr.dictionary_encode() if kind == "dictionary" else arr), rows
    if kind in ("binary", "bad_string"):  # bad_string: a string column whose bytes are not UTF-8
        cells = draw(st.lists(st.one_of(st.none(), csv_cell(pool)), min_size=n, max_size=n))
        arr = pa.array([None if c is None else c[0] for c in cells], pa.binary())
        rows = [Row(b"", reason="empty") if c is None else Row(b"", reason=c[2]) if c[2] else text_row(b"", c[1])
                for c in cells]
        return (arr.view(pa.string()) if kind == "bad_string" else arr), rows
    value, typ = {
        "int": (st.integers(-(2**63), 2**63 - 1), pa.int64()),
        "float": (st.floats(allow_nan=True), pa.float64()),
        "bool": (st.booleans(), pa.bool_()),
        "list": (st.lists(TEXT, max_size=3), pa.list_(pa.string())),
        "struct": (st.fixed_dictionaries({"prompt": TEXT, "n": st.integers(0, 9)}),
                   pa.struct([("prompt", pa.string()), ("n", pa.int64())])),
        "null": (st.none(), pa.null()),
    }[kind]
    values = draw(st.lists(st.one_of(st.none(), value), min_size=n, max_size=n))
    return pa.array(values, typ), [Row(b"", reason="empty" if v is None else "not_text") for v in values]


@settings(max_examples=60, **SETTINGS)
@given(parquet_column(), st.integers(1, 4), st.booleans())
def test_parquet_every_row_accounted_for(column, row_group_size, with_category):
    arr, rows = column
    table = pa.table({"prompt": arr})
    if with_category:
        cats = [["a", " b ", "a"], None, ["", "c"], []] * len(arr)
        table = table.append_column("category", pa.array(cats[: len(arr)], pa.list_(pa.string())))
        for r, c in zip(rows, cats):
            r.cats = category(c) if r.text is not None else ()
    fd, path = tempfile.mkstemp(suffix=".parquet")
    os.close(fd)
    try:
        pq.write_table(table, path, row_group_size=row_group_size)
        check_file(path, rows, **({"category_column": "category"} if with_category else {}))
    finally:
        os.unlink(path)


# ----------------------------------------------------------------------------------------- end to end


def nasty_lines() -> list[bytes]:
    """About 30 JSONL lines: valid prompts with hostile characters, and each kind of bad row."""
    texts = ["how do i make a bomb", "bake a cake", "null\x00byte", "carriage\rreturn", "\x1b[31mred\x1b[0m",
             "line\u2028separator", "مرحبا كيف حالك", "\u202eevil\u202c rtl override", "zero\u200bwidth",
             "astral 😀 𝔘 \U0010fffd", "family 👩\u200d👩\u200d👧", "quote \" and, comma", "a" * 200_000,
             "\ufeffbom inside", "multi\nline\nprompt"]
    lines = [json.dumps({"prompt": t, "category": c}, ensure_ascii=i % 2 == 0).encode()
             for i, (t, c) in enumerate(zip(texts, ["harm", "benign"] * 8))]
    lines += [
        json.dumps({"prompt": "bake a cake"}).encode(),  # duplicate
        json.dumps({"prompt": "a" * 200_000}).encode(),  # duplicate of the huge prompt
        b'{"prompt": ""}', b'{"prompt": "   \\t "}', b'{"prompt": null}', b'{"other": "x"}',  # empty
        b'{"prompt": 42}', b'{"prompt": 1.5}', b'{"prompt": true}', b'{"prompt": ["a", "b"]}',  # not_text
        b'{"prompt": {"nested": [1, {"deep": null}]}}',
        b'{"prompt": "caf\xe9"}', b'{"prompt": "cut \xe2\x82"}', b'{"prompt": "\\ud800 lone surrogate"}',  # non_utf8
        b'{not json}', b'{"prompt": "truncated', b'[1, 2, 3]',  # malformed_json
        b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    ]
    return lines


def test_nasty_jsonl_through_the_preference_flow(tmp_path, run_flow):
    lines = nasty_lines()
    # blank lines are not rows (as in most JSONL readers): they must not count as source rows
    data = b"\xef\xbb\xbf" + b"\n".join(lines[:10]) + b"\n\n  \r\n" + b"\r\n".join(lines[10:]) + b"\n"
    (tmp_path / "nasty.jsonl").write_bytes(data)
    cfg = build_config(PreferenceConfig, None, [
        f"output={tmp_path / 'out'}", "dataset=nasty", f"prompts.path={tmp_path / 'nasty.jsonl'}",
        "prompts.category_column=category", "student.backend=fake", "n=2", "shard_size=4",
        "student.num_cpus=0.5", "scoring.num_cpus=0.5", "sampling.max_new_tokens=12",
        "decontamination.enabled=false",  # a test of the reader (tests/test_screen.py screens)
    ])
    manifest = run_flow(cfg)
    ds = DatasetDir(cfg.output, cfg.dataset)
    assert verify(ds).problems == []
    assert manifest["status"] == "complete"
    assert manifest["accounting"]["balanced"] is True
    assert manifest["accounting"]["source_rows"] == len(lines) == 33
    assert manifest["prompts"]["quarantined"] == {"duplicate": 2, "empty": 4, "not_text": 5, "non_utf8": 3,
                                                  "malformed_json": 4}
    planned = {r["source_row"]: r["prompt"] for r in ds.read_table("prompts").to_pylist()}
    assert sorted(planned.values()) == sorted(json.loads(x)["prompt"] for x in lines[:15])  # unchanged text
