"""Load, validate, deduplicate and shard prompts. Pure: no Prefect, Ray or torch.

Row contract: reads `prompt_column` (and `category_column` if set) from Parquet, JSONL or CSV;
writes PromptRow records keyed by `prompt_id`, a content hash of the prompt text.
Bad rows are quarantined with a reason, never dropped silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from tasks.config import PromptSource
from tasks.errors import UserError
from tasks.schemas import require_columns

BUNDLED_SAMPLES = {"sample": "sample_prompts.jsonl", "distill_sample": "distill_sample.jsonl"}
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


def _source_path(src: PromptSource) -> str:
    if src.path in BUNDLED_SAMPLES:
        return str(resources.files("tasks.data") / BUNDLED_SAMPLES[src.path])
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


def read_raw(src: PromptSource) -> tuple[list[str], list[object], list[object]]:
    """Column names, raw prompt values and raw category values (bytes/str/None, or a decode error)."""
    path = _source_path(src)
    fmt = _format(path)
    wanted = [src.prompt_column] + ([src.category_column] if src.category_column else [])
    with _open(path) as f:
        if fmt == "jsonl":
            return _read_jsonl(f, src, wanted, path)
        if fmt in ("csv", "tsv"):
            # Read as binary so that one bad byte quarantines one row instead of failing the file.
            table = pacsv.read_csv(
                f,
                parse_options=pacsv.ParseOptions(newlines_in_values=True, delimiter="\t" if fmt == "tsv" else ","),
                convert_options=pacsv.ConvertOptions(column_types={c: pa.binary() for c in wanted}),
            )
        else:
            table = pq.read_table(f, use_threads=False)  # see DatasetDir.read_table
    require_columns(table.column_names, wanted, f"prompt file {path}")
    prompts = table.column(src.prompt_column).to_pylist()
    cats = table.column(src.category_column).to_pylist() if src.category_column else [None] * len(prompts)
    return table.column_names, prompts, cats


class _BadLine:
    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail


def _read_jsonl(f, src: PromptSource, wanted: list[str], path: str):
    prompts, cats, seen_cols = [], [], {}
    for raw in f:
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except UnicodeDecodeError as exc:
            obj = _BadLine("non_utf8", str(exc))
        except json.JSONDecodeError as exc:
            obj = _BadLine("malformed_json", str(exc))
        if isinstance(obj, dict):
            seen_cols.update(dict.fromkeys(obj))
            prompts.append(obj.get(src.prompt_column))
            cats.append(obj.get(src.category_column) if src.category_column else None)
        else:
            prompts.append(obj if isinstance(obj, _BadLine) else _BadLine("malformed_json", "not an object"))
            cats.append(None)
    require_columns(list(seen_cols), wanted, f"prompt file {path}")
    return list(seen_cols), prompts, cats


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
    if not value.strip():
        return None, "empty", "empty or whitespace-only"
    return value, None, None


def _categories(raw: object) -> tuple[str, ...]:
    """A category cell holds one category, or a list of them (as in STAR-41K)."""
    items = raw if isinstance(raw, (list, tuple)) else [raw]
    out = []
    for item in items:
        text, _, _ = _decode(item)
        if text is not None:
            out.append(text.strip())
    return tuple(dict.fromkeys(out))


def load_prompts(src: PromptSource) -> PromptSet:
    _, raw_prompts, raw_cats = read_raw(src)
    if src.limit is not None:
        raw_prompts, raw_cats = raw_prompts[: src.limit], raw_cats[: src.limit]
    return decode_rows(raw_prompts, raw_cats)


def decode_rows(raw_prompts: list, raw_cats: list, key=None, dedup: bool = True) -> PromptSet:
    """Decode raw cells into PromptRows, quarantining bad ones. `key(i, text)` gives the prompt_id
    (default: the content hash); with dedup off, rows with equal text are all kept (their keys differ)."""
    out = PromptSet(rows=[], source_rows=len(raw_prompts))
    seen: set[str] = set()
    for i, (raw, raw_cat) in enumerate(zip(raw_prompts, raw_cats)):
        text, reason, detail = _decode(raw)
        if reason is not None:
            out.quarantine.append(
                {"prompt_id": None, "source_row": i, "prompt": None, "reason": reason, "detail": detail}
            )
            continue
        pid = key(i, text) if key else prompt_id(text)
        if dedup and pid in seen:
            out.duplicates += 1
            continue
        seen.add(pid)
        cats = _categories(raw_cat)
        out.rows.append(PromptRow(pid, text, "; ".join(cats) or None, i, cats))
    return out


def check_columns(src: PromptSource) -> None:
    """Cheap preflight: the file exists, has a known format and the named columns."""
    read_raw(src.model_copy(update={"limit": 1}))


def make_shards(rows: list[PromptRow], shard_size: int, salt: str) -> list[Shard]:
    """Fixed-size shards in input order; the id hashes the salt (config) and the prompt ids inside."""
    shards = []
    for index, start in enumerate(range(0, len(rows), shard_size)):
        chunk = tuple(rows[start : start + shard_size])
        digest = hashlib.sha256((salt + "".join(r.prompt_id for r in chunk)).encode()).hexdigest()[:16]
        shards.append(Shard(shard_id=digest, index=index, rows=chunk))
    return shards
