"""Load, validate, deduplicate and shard prompts. Pure: no Prefect, Ray or torch.

Row contract: reads `prompt_column` (and `category_column`, `max_new_tokens_column` if set) from Parquet, JSONL
or CSV;
writes PromptRow records keyed by `prompt_id`, a content hash of the prompt text.
Bad rows are quarantined with a reason, never dropped silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dafactory.tasks.config import PromptSource
from dafactory.tasks.errors import UserError
from dafactory.tasks.io.schemas import require_columns

BUNDLED_SAMPLES = {"sample": "sample_prompts.jsonl", "distill_sample": "distill_sample.jsonl"}
# Bundled evaluation sets: name -> (file, prompt column). Evaluation reads them; decontamination too.
BUNDLED_BENCHMARKS = {
    "strongreject": ("strongreject.csv", "forbidden_prompt"),
    "dan": ("dan_jailbreak_prompts_2023_12_25.csv", "prompt"),
}
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}


def prompt_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class PromptRow:
    prompt_id: str
    prompt: str
    category: str | None  # the categories joined with "; " (one string column in every table)
    source_row: int
    categories: tuple[str, ...] = ()
    reference: tuple | None = None  # utility benchmarks: (kind, reference answer, number of choices)
    max_new_tokens: int | None = None  # the row's own bound on new tokens (max_new_tokens_column); None: the config's


@dataclass
class PromptSet:
    rows: list[PromptRow]
    quarantine: list[dict] = field(default_factory=list)
    duplicates: int = 0
    source_rows: int = 0


@dataclass(frozen=True)
class Shard:
    shard_id: str
    index: int
    rows: tuple[PromptRow, ...]


def bundled(filename: str):
    """A file shipped in the package's data folder (a Traversable)."""
    return resources.files("dafactory.tasks.data") / filename


def source_path(src: PromptSource) -> str:
    if src.path in BUNDLED_SAMPLES:
        return str(bundled(BUNDLED_SAMPLES[src.path]))
    if src.path in BUNDLED_BENCHMARKS:
        return str(bundled(BUNDLED_BENCHMARKS[src.path][0]))
    return src.path


def _format(path: str) -> str:
    for suffix, fmt in FORMATS.items():
        if path.lower().endswith(suffix):
            return fmt
    raise UserError(f"prompt file {path}: unsupported format; use one of {sorted(set(FORMATS))}")


def _open(path: str):
    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        raise UserError(f"prompt file not found: {path}")
    return fs.open(fs_path, "rb")


def _check(columns: list[str], wanted: list[str], path: str) -> None:
    require_columns(columns, wanted, f"prompt file {path}")


def iter_raw(src: PromptSource, batch_rows: int = 8192) -> Iterator[tuple[list, list, list]]:
    """Raw prompt, category and max_new_tokens values (bytes/str/None, or a decode error; None where the column
    is not set), `batch_rows` source rows at a time: the file is streamed, never read whole. Stops after
    `src.limit` rows."""
    path = source_path(src)
    fmt = _format(path)
    wanted = [src.prompt_column] + [c for c in (src.category_column, src.max_new_tokens_column) if c]
    left = src.limit if src.limit is not None else float("inf")
    with _open(path) as f:
        if fmt == "jsonl":
            chunks = _jsonl_chunks(f, src, wanted, path, batch_rows)
        elif fmt in ("csv", "tsv"):
            chunks = _arrow_chunks(_csv_batches(f, fmt, wanted, batch_rows), src, wanted, path)
        else:
            try:
                pf = pq.ParquetFile(f)
            except (pa.ArrowException, OSError) as exc:  # not Parquet at all, or a truncated file
                raise UserError(f"prompt file {path}: not a readable Parquet file ({str(exc).strip()[:200]})") from None
            _check(pf.schema_arrow.names, wanted, path)
            # use_threads=False: see DatasetDir.read_table
            chunks = _arrow_chunks(pf.iter_batches(batch_rows, columns=wanted, use_threads=False), src, wanted, path)
        for prompts, cats, budgets in chunks:
            if left <= 0:
                return
            if len(prompts) > left:
                prompts, cats, budgets = prompts[: int(left)], cats[: int(left)], budgets[: int(left)]
            left -= len(prompts)
            yield prompts, cats, budgets


def _csv_batches(f, fmt: str, wanted: list[str], batch_rows: int):
    # Read as binary so that one bad byte quarantines one row instead of failing the file.
    # A generator, so that Arrow's parse errors surface in _arrow_chunks, which names the file.
    block = 1 << 22
    options = dict(
        read_options=pacsv.ReadOptions(use_threads=False, block_size=block),
        parse_options=pacsv.ParseOptions(newlines_in_values=True, delimiter="\t" if fmt == "tsv" else ","),
        convert_options=pacsv.ConvertOptions(column_types={c: pa.binary() for c in wanted}),
    )
    try:
        reader = pacsv.open_csv(f, **options)
    except pa.ArrowInvalid:
        # Arrow cannot read a lone header line with no newline after it: give it one.
        f.seek(0)
        head = f.read(block + 1)
        if not head.strip() or len(head) > block or b"\n" in head or b"\r" in head:
            raise
        reader = pacsv.open_csv(pa.BufferReader(head + b"\n"), **options)
    empty = True
    for batch in reader:  # Arrow's batches are blocks of bytes: cut them to batch_rows rows
        for start in range(0, batch.num_rows, batch_rows):
            empty = False
            yield batch.slice(start, batch_rows)
    if empty:  # a header and no rows: one empty batch, so that the header is still checked
        yield pa.RecordBatch.from_pylist([], schema=reader.schema)


def _arrow_chunks(batches, src: PromptSource, wanted: list[str], path: str):
    def cells(column: pa.Array) -> list:
        try:
            return column.to_pylist()
        except UnicodeDecodeError:  # a string column holding bytes that are not UTF-8 (not every writer checks)
            out = []
            for i in range(len(column)):
                try:
                    out.append(column[i].as_py())
                except UnicodeDecodeError as exc:
                    out.append(_BadLine("non_utf8", str(exc)))
            return out

    checked, batches = False, iter(batches)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except pa.ArrowInvalid as exc:  # a CSV row with another number of fields, an empty CSV file
            raise UserError(f"prompt file {path}: {' '.join(str(exc).split())[:300]}") from None
        if not checked:
            _check(batch.schema.names, wanted, path)
            checked = True
        prompts = cells(batch.column(src.prompt_column))
        none = [None] * len(prompts)
        cats = cells(batch.column(src.category_column)) if src.category_column else none
        budgets = cells(batch.column(src.max_new_tokens_column)) if src.max_new_tokens_column else none
        yield prompts, cats, budgets


def read_raw(src: PromptSource) -> tuple[list[object], list[object]]:
    """Raw prompt values and raw category values of the whole file (small files: benchmarks; large
    inputs go through iter_raw)."""
    prompts, cats = [], []
    for p, c, _ in iter_raw(src):
        prompts += p
        cats += c
    return prompts, cats


class _BadLine:
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail


def _jsonl_chunks(f, src: PromptSource, wanted: list[str], path: str, batch_rows: int):
    # The columns are checked once, over the keys of the first `window` rows (the whole file if shorter),
    # and batches are held back until then: whether a file fails must not depend on batch_rows.
    window = 8192
    prompts, cats, budgets, seen_cols, held, rows = [], [], [], {}, [], 0
    for raw in f:
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except UnicodeDecodeError as exc:
            obj = _BadLine("non_utf8", str(exc))
        except (ValueError, RecursionError) as exc:  # bad JSON, an int past 4300 digits, too deeply nested
            obj = _BadLine("malformed_json", str(exc))
        if isinstance(obj, dict):
            if rows < window:
                seen_cols.update(dict.fromkeys(obj))
            prompts.append(obj.get(src.prompt_column))
            cats.append(obj.get(src.category_column) if src.category_column else None)
            budgets.append(obj.get(src.max_new_tokens_column) if src.max_new_tokens_column else None)
        else:
            prompts.append(obj if isinstance(obj, _BadLine) else _BadLine("malformed_json", "not an object"))
            cats.append(None)
            budgets.append(None)
        rows += 1
        if len(prompts) == batch_rows:
            held.append((prompts, cats, budgets))
            prompts, cats, budgets = [], [], []
        if rows == window:
            _check(list(seen_cols), wanted, path)
        if rows >= window:
            yield from held
            held = []
    if rows < window:
        _check(list(seen_cols), wanted, path)
    yield from held
    if prompts:
        yield prompts, cats, budgets


def _decode(value: object) -> tuple[str | None, str | None, str | None]:
    """(text, quarantine reason, detail)."""
    if isinstance(value, _BadLine):
        return None, value.reason, value.detail
    if value is None:
        return None, "empty", "missing value"
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, "non_utf8", str(exc)
    if not isinstance(value, str):
        return None, "not_text", f"value of type {type(value).__name__}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate, from a "\ud800" escape in JSON
        # or from surrogate bytes, which json.loads decodes with surrogatepass
        return None, "non_utf8", str(exc)
    if not value.strip():
        return None, "empty", "empty or whitespace-only"
    return value, None, None


def _budget(raw: object) -> tuple[int | None, str | None]:
    """(a row's own max_new_tokens, or None for none; the problem with the cell, or None). A CSV cell comes as
    bytes; an empty one means none."""
    if isinstance(raw, _BadLine):  # a string cell that is not UTF-8
        return None, "not UTF-8"
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, "not UTF-8"
    if isinstance(raw, str):
        if not raw.strip():
            return None, None
        try:
            raw = int(raw.strip())
        except ValueError:
            return None, f"{raw[:40]!r} is not a whole number"
    if isinstance(raw, float) and raw.is_integer():
        raw = int(raw)
    if raw is None:
        return None, None
    if isinstance(raw, bool) or not isinstance(raw, int):
        return None, f"{str(raw)[:40]!r} is not a whole number"
    if raw < 1:
        return None, f"{raw} is below 1"
    return raw, None


def _categories(raw: object) -> tuple[str, ...]:
    """A category cell holds one category, or a list of them (as in STAR-41K)."""
    items = raw if isinstance(raw, (list, tuple)) else [raw]
    out = []
    for item in items:
        text, _, _ = _decode(item)
        if text is not None:
            out.append(text.strip())
    return tuple(dict.fromkeys(out))


class SeenIds:
    """A set of prompt ids (hex content hashes) in 8 bytes each: a sorted numpy array plus a small
    Python set of recent ids, merged in from time to time. Dedup over millions of prompts stays small."""

    def __init__(self, flush_at: int = 1 << 16):
        self.sorted = np.empty(0, dtype=np.uint64)
        self.recent: set[int] = set()
        self.flush_at = flush_at

    def add(self, pid: str) -> bool:
        """Add an id; False if it was already there."""
        key = int(pid[:16], 16)
        if key in self.recent:
            return False
        i = np.searchsorted(self.sorted, np.uint64(key))
        if i < len(self.sorted) and self.sorted[i] == key:
            return False
        self.recent.add(key)
        if len(self.recent) >= self.flush_at:
            self._flush()
        return True

    def add_many(self, pids: list[str]) -> list[bool]:
        """add() of each id in order, with one vectorised lookup in the sorted array for the batch."""
        keys = [int(p[:16], 16) for p in pids]
        if len(self.sorted) and keys:
            arr = np.array(keys, dtype=np.uint64)
            at = np.minimum(np.searchsorted(self.sorted, arr), len(self.sorted) - 1)
            old = (self.sorted[at] == arr).tolist()
        else:
            old = [False] * len(keys)
        recent, fresh = self.recent, []
        for key, seen_before in zip(keys, old):
            if seen_before or key in recent:
                fresh.append(False)
            else:
                recent.add(key)
                fresh.append(True)
        if len(recent) >= self.flush_at:
            self._flush()
        return fresh

    def _flush(self) -> None:
        self.sorted = np.union1d(self.sorted, np.fromiter(self.recent, dtype=np.uint64, count=len(self.recent)))
        self.recent = set()


def repeat_categories(src: PromptSource, batch_rows: int = 8192) -> dict[str, tuple[str, ...]]:
    """prompt_id -> the categories of the prompt's repeats (its second and later rows), in file order:
    one streamed pass over the file ahead of iter_prompts' own, holding only the ids seen (SeenIds) and
    the repeats that carry a category. A first occurrence is yielded (and may be planned into a shard)
    before its repeats are read, so they must be known beforehand for it to carry their categories."""
    seen, out = SeenIds(), {}
    for raw_prompts, raw_cats, _ in iter_raw(src, batch_rows):
        for raw, raw_cat in zip(raw_prompts, raw_cats):
            text, reason, _ = _decode(raw)
            if reason is not None:
                continue
            pid = prompt_id(text)
            if not seen.add(pid) and (cats := _categories(raw_cat)):
                out[pid] = tuple(dict.fromkeys(out.get(pid, ()) + cats))
    return out


def iter_prompts(src: PromptSource, batch_rows: int = 8192, late: dict | None = None) -> Iterator[PromptSet]:
    """The prompt file as PromptSets of at most `batch_rows` source rows, deduplicated across batches.
    A prompt repeated with other categories keeps them all, on its first row, whatever the batch size:
    with a category column the file is read twice (see repeat_categories). Unless the caller passes
    `late`, a dict: then the file is read once, and the categories repeats bring are put there
    (prompt_id -> categories, in file order) for the caller to add to the first rows (see add_late)."""
    repeats = repeat_categories(src, batch_rows) if src.category_column and late is None else {}
    seen, offset = SeenIds(), 0
    for raw_prompts, raw_cats, raw_budgets in iter_raw(src, batch_rows):
        yield decode_rows(raw_prompts, raw_cats, seen=seen, offset=offset, repeats=repeats, late=late,
                          raw_budgets=raw_budgets)
        offset += len(raw_prompts)


def add_late(categories: tuple[str, ...], late: tuple[str, ...]) -> tuple[tuple[str, ...], str | None]:
    """A first row's categories with those its repeats brought (iter_prompts' `late`), and the joined
    category string, as decode_rows makes them."""
    cats = tuple(dict.fromkeys(categories + late))
    return cats, "; ".join(cats) or None


def merge(sets) -> PromptSet:
    out = PromptSet(rows=[], quarantine=[], duplicates=0, source_rows=0)
    for s in sets:
        out.rows += s.rows
        out.quarantine += s.quarantine
        out.duplicates += s.duplicates
        out.source_rows += s.source_rows
    return out


def load_prompts(src: PromptSource) -> PromptSet:
    return merge(iter_prompts(src))


def decode_rows(raw_prompts: list, raw_cats: list, key=None, dedup: bool = True, seen: SeenIds | None = None,
                offset: int = 0, repeats: dict[str, tuple[str, ...]] | None = None,
                late: dict[str, tuple[str, ...]] | None = None, raw_budgets: list | None = None) -> PromptSet:
    """Decode raw cells into PromptRows, quarantining bad ones (and repeated prompts, as `duplicate`).
    `key(i, text)` gives the prompt_id (default: the content hash); with dedup off, rows with equal text
    are all kept (their keys differ). Source rows are numbered from `offset`. `repeats` (prompt_id ->
    categories of its repeats) adds to a first occurrence the categories its duplicates bring. `raw_budgets`
    (a max_new_tokens cell per row) gives each row its own bound; a bad cell quarantines its row."""
    out = PromptSet(rows=[], source_rows=len(raw_prompts))
    seen = seen if seen is not None else SeenIds()
    decoded = [_decode(raw) for raw in raw_prompts]
    budgets = [_budget(b) for b in raw_budgets] if raw_budgets is not None else [(None, None)] * len(decoded)
    # a row with a bad max_new_tokens cell takes no part in dedup: a later row of the same text may be kept
    pids = [None if reason is not None or bad is not None else key(i, text) if key else prompt_id(text)
            for i, ((text, reason, _), (_, bad)) in enumerate(zip(decoded, budgets), start=offset)]
    fresh = iter(seen.add_many([pid for pid in pids if pid is not None]) if dedup else [])
    for i, ((text, reason, detail), pid, raw_cat, (budget, bad)) in enumerate(
            zip(decoded, pids, raw_cats, budgets), start=offset):
        if reason is not None:
            out.quarantine.append(
                {"prompt_id": None, "source_row": i, "prompt": None, "reason": reason, "detail": detail}
            )
            continue
        if bad is not None:
            out.quarantine.append({"prompt_id": None, "source_row": i, "prompt": text[:200],
                                   "reason": "bad_max_new_tokens", "detail": f"max_new_tokens: {bad}"})
            continue
        if dedup and not next(fresh):
            out.duplicates += 1
            brought = _categories(raw_cat) if repeats or late is not None else ()
            if late is not None and brought:
                late[pid] = tuple(dict.fromkeys(late.get(pid, ()) + brought))
            kept = ", which takes its categories" if brought else ""
            out.quarantine.append({"prompt_id": pid, "source_row": i, "prompt": text[:200], "reason": "duplicate",
                                   "detail": "same text as an earlier row" + kept})
            continue
        cats = _categories(raw_cat)
        if dedup and repeats and pid in repeats:
            cats = tuple(dict.fromkeys(cats + repeats[pid]))
        out.rows.append(PromptRow(pid, text, "; ".join(cats) or None, i, cats, max_new_tokens=budget))
    return out


def check_budget_column(src: PromptSource, quarantined: dict, source_rows: int) -> None:
    """A max_new_tokens column whose cells are mostly bad is the wrong column, not bad rows: a one-line error
    (before any model loads) instead of a build of the few rows left."""
    bad = quarantined.get("bad_max_new_tokens", 0)
    if src.max_new_tokens_column and bad * 2 > source_rows:
        raise UserError(f"prompts.max_new_tokens_column {src.max_new_tokens_column!r}: {bad} of {source_rows} rows "
                        "hold no whole number >= 1 (see the quarantine's bad_max_new_tokens rows); is it the right "
                        "column?")


def check_columns(src: PromptSource) -> None:
    """Cheap preflight: the file exists, has a known format and the named columns."""
    read_raw(src.model_copy(update={"limit": 1}))


def shard_id_of(salt: str, row_keys) -> str:
    """A shard's id: the salt (what decides the generated text for every prompt) and the key of each
    prompt inside (its id and what else decides its rows: categories, reference)."""
    return hashlib.sha256((salt + "".join(row_keys)).encode()).hexdigest()[:16]


def choose_buckets(unique: int, shard_size: int, previous: int | None = None) -> int:
    """How many id ranges (shards) to cut the prompts into: about `shard_size` prompts each. A folder
    built before keeps its count while the input stays within a factor of two of it, so that a nightly
    input that grows or shrinks a little re-plans only the shards whose prompts changed."""
    target = max(1, -(-unique // shard_size))
    if previous and target / 2 <= previous <= 2 * target:
        return previous
    return target


def bucket_of(ids: np.ndarray, buckets: int) -> np.ndarray:
    """The bucket of each prompt id (its 64-bit hash as uint64): `buckets` equal ranges of the id
    space, in id order. Depends on nothing but the id, so the input's order and other rows never move
    a prompt to another shard."""
    return ((ids >> np.uint64(32)) * np.uint64(buckets)) >> np.uint64(32)


def id_hashes(prompt_ids: list[str]) -> np.ndarray:
    """Prompt ids (16 hex digits of a SHA-256) as uint64, ordered as the ids sort."""
    return np.array([int(p, 16) for p in prompt_ids], dtype=np.uint64)
