"""`dafactory verify`: recompute a dataset's accounting from its files alone and compare it with the
manifest. Pure: no Prefect, Ray or torch.

What it proves, shard by shard, reading only the part files the manifest lists:
- every source row of the input is in exactly one place: the `prompts` table (planned) or the input
  quarantine (set aside with a reason); no row is missing and none is there twice;
- every planned prompt of a built shard has output rows or a quarantine row with a reason (never
  both, never neither); a prompt of a failed or unbuilt shard has neither;
- no key is duplicated: prompt ids across the plan, (prompt_id, sample_idx) across the sample tables,
  prompt_id within pairs/best;
- every part and compact file the version lists exists and is readable, each compact file holds as
  many rows as its parts, and every shard with a marker has every table's part (or its marker's stats say that table had 0 rows), with the rows the stats say;
- the manifest's row counts and accounting equal what the files say.

It checks the current version (the highest readable one in `_versions/`, whatever `manifest.json`
says) and notes, without failing, what a reader never sees: unreadable version files and files in a
table's folder that are not parts.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from dafactory.tasks.io.commit import read_version, version_files
from dafactory.tasks.io.compact import is_compact
from dafactory.tasks.io.prompts import SeenIds
from dafactory.tasks.io.storage import STATS_KEY, DatasetDir, part_key, part_name

COMPLETE, MISMATCH, INCOMPLETE = 0, 1, 3  # exit codes


@dataclass
class Verdict:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what no reader sees, named for the curious
    counts: dict = field(default_factory=dict)
    status: str = "complete"

    @property
    def code(self) -> int:
        if self.problems:
            return MISMATCH
        return COMPLETE if self.status == "complete" else INCOMPLETE


def _part_name(path: str) -> str:
    """The key a part stands for: its shard id (or input-..., summary), without its token or hash."""
    return part_key(part_name(path))


@dataclass
class Part:
    """One part, opened once: its rows, its footer's key-value metadata and the key columns asked for;
    `error` when it is not whole Parquet."""

    rows: int = 0
    meta: dict = field(default_factory=dict)
    table: pa.Table | None = None
    error: str | None = None


def _open(ds: DatasetDir, path: str, columns: list[str] | None) -> Part:
    """A part's footer and only these columns (the rest of its bytes are not fetched from an object
    store); a part that is not whole Parquet is a Part with the error, not an exception."""

    def read():
        with ds.parquet(path) as pf:
            table = pf.read(columns=columns, use_threads=False) if columns is not None else None
            return Part(pf.metadata.num_rows, pf.metadata.metadata or {}, table)

    try:
        return ds._retry(f"read {posixpath.relpath(path, ds.root)}", read)
    except pa.ArrowInvalid as exc:
        return Part(error=str(exc).splitlines()[0][:120])


def _ids(table: pa.Table) -> list:
    return table.column("prompt_id").to_pylist()


def _too_many(problems: list[str], what: str, items) -> None:
    items = sorted(map(str, items))
    if items:
        problems.append(f"{what}: {len(items)} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")


def _notes(ds: DatasetDir, manifest: dict, notes: list[str]) -> None:
    """Unreadable version files, and files in the version's table folders that are neither parts nor
    compact files it lists."""
    for e in version_files(ds):
        if e["version"] > manifest["version"] or (e["version"] != manifest["version"]
                                                  and read_version(ds, e["version"]) is None):
            notes.append(f"_versions/{e['name']}: unreadable version file, skipped (never current)")
    listed = {ds._inside(c) for c in ds.compacted(manifest).values()}
    for table in manifest["tables"]:
        for e in ds.listing(table):
            if e["path"] in listed or (e["name"].startswith("part-") and e["name"].endswith(".parquet")):
                continue
            what = "a compact file this version does not list" if is_compact(e["name"]) else "not a part"
            notes.append(f"{table}/{e['name']}: {what} (no version lists it; vacuum removes it)")


def _check_compacts(ds: DatasetDir, manifest: dict, part_rows: dict[str, int], p: list[str]) -> None:
    """Each compact file the version lists is whole Parquet and holds its members' rows, all of them."""
    members: dict[str, list[str]] = {}
    for part, c in ds.compacted(manifest).items():
        members.setdefault(c, []).append(ds._inside(part))
    if not members:
        return
    names = sorted(members)
    opened = ds.concurrently(lambda c: _open(ds, ds._inside(c), None), names)
    for c, part in zip(names, opened):
        want = sum(part_rows.get(m, 0) for m in members[c])
        if part.error is not None:
            p.append(f"{c}: unreadable compact file ({part.error})")
        elif part.rows != want:
            p.append(f"{c}: holds {part.rows} rows, its {len(members[c])} parts hold {want}")


@dataclass
class Shard:
    """What one shard's check found."""

    shard_id: str
    problems: list[str]
    acc: Counter
    rows: Counter  # rows per table of its parts
    source_rows: np.ndarray
    ids: list


def _check_shard(ds: DatasetDir, shard_id: str, paths: dict[str, str], layout: dict, failed: set) -> Shard:
    """One shard, each of its parts opened once: its key columns, its row counts, its marker's stats.
    Every planned prompt has output or a quarantine row, no key is there twice, and the version has every
    table's part that the marker's stats say had rows."""
    p, acc, rows = [], Counter(), Counter()
    columns = {"prompts": ["prompt_id", "source_row"], "quarantine": ["prompt_id"]}
    columns |= {t: ["prompt_id", "sample_idx"] for t in layout["sample_tables"]}
    columns |= {t: ["prompt_id"] for t in layout.get("one_row_per_prompt", [])}
    parts = {}
    for table, path in paths.items():
        part = _open(ds, path, columns.get(table, []))
        if part.error is not None:
            p.append(f"{table}: unreadable part {posixpath.basename(path)} ({part.error})")
            continue
        parts[table], rows[table] = part, part.rows
    if len(parts) < len(paths) or "prompts" not in parts:
        return Shard(shard_id, p, acc, rows, np.empty(0, dtype=np.int64), [])
    t = parts["prompts"].table
    ids = set(_ids(t))
    acc["planned_prompts"] += t.num_rows
    out, keys = set(), Counter()
    for table in layout["sample_tables"]:
        if table in parts:
            part = parts[table].table
            out.update(_ids(part))
            keys.update(zip(_ids(part), part.column("sample_idx").to_pylist()))
    quarantined = Counter(_ids(parts["quarantine"].table)) if "quarantine" in parts else Counter()
    _too_many(p, f"shard {shard_id}: (prompt_id, sample_idx) written twice", [k for k, n in keys.items() if n > 1])
    _too_many(p, f"shard {shard_id}: prompts quarantined twice", [k for k, n in quarantined.items() if n > 1])
    _too_many(p, f"shard {shard_id}: prompts both in output and quarantine", out & set(quarantined))
    _too_many(p, f"shard {shard_id}: rows for prompts not planned in it", (out | set(quarantined)) - ids)
    for table in layout.get("one_row_per_prompt", []):
        if table in parts:
            c = Counter(_ids(parts[table].table))
            _too_many(p, f"shard {shard_id}: {table} rows twice for a prompt", [k for k, n in c.items() if n > 1])
            _too_many(p, f"shard {shard_id}: {table} rows for prompts without output", set(c) - out)
    marker = parts.get(layout["marker"])
    if marker is not None:
        _too_many(p, f"shard {shard_id}: prompts missing (no output, no quarantine)", ids - out - set(quarantined))
        acc["prompts_with_output"] += len(out)
        acc["prompts_quarantined_in_shards"] += len(quarantined)
        stats = json.loads(marker.meta.get(STATS_KEY, b"{}"))
        for table in layout.get("tables", []):
            want = stats.get("rows", {}).get(table)
            if table not in parts and want:
                p.append(f"shard {shard_id}: its marker says {want} {table} rows, the version lists no part")
            elif table in parts and want is not None and parts[table].rows != want:
                p.append(f"shard {shard_id}: its marker says {want} {table} rows, the part holds {parts[table].rows}")
    elif shard_id in failed:
        acc["prompts_in_failed_shards"] += len(ids)
    else:
        acc["prompts_in_unbuilt_shards"] += len(ids)
    if marker is None and (out or quarantined):
        p.append(f"shard {shard_id}: not marked done but has output or quarantine rows")
    return Shard(shard_id, p, acc, rows, t.column("source_row").to_numpy(zero_copy_only=False), _ids(t))


def verify(ds: DatasetDir) -> Verdict:
    v = Verdict()
    manifest = ds.read_manifest()
    if manifest is None:
        v.problems.append("no manifest.json: the dataset was never finished (a run is in progress or failed)")
        return v
    v.status = manifest["status"]
    layout = manifest["layout"]
    p = v.problems
    _notes(ds, manifest, v.notes)

    # 1. Every listed part and compact file exists (one listing per table).
    files = {t: ds.listed_files(t, manifest) for t in manifest["tables"]}
    compacts = {ds._inside(c) for c in ds.compacted(manifest).values()}
    for table, paths in files.items():
        there = {e["path"] for e in ds.listing(table)} if paths else set()
        wanted = paths + sorted(c for c in compacts if posixpath.basename(posixpath.dirname(c)) == table)
        _too_many(p, f"{table}: files the manifest lists but that do not exist", [x for x in wanted if x not in there])
    if p:
        return v  # the shard-by-shard checks below would only repeat it

    # 2. The parts of each planned shard, by table; the rest (input quarantine, summaries) on their own.
    plan = {_part_name(x): x for x in files.get("prompts", [])}
    by_shard: dict[str, dict[str, str]] = {sid: {} for sid in plan}
    others = []
    for table, paths in files.items():
        for x in paths:
            sid = _part_name(x)
            if sid in by_shard:
                by_shard[sid][table] = x
            elif table in layout.get("tables", []) and not sid.startswith("input"):
                p.append(f"{table}: {posixpath.basename(x)} belongs to no planned shard")
            else:
                others.append((table, x))
    rows, part_rows = Counter(), {}
    source_rows = manifest["accounting"]["source_rows"]
    rows_seen, seen_ids, dup_ids = [], SeenIds(), []
    set_aside = 0
    with ThreadPoolExecutor(ds.io_threads) as pool:
        for (table, x), part in zip(others, pool.map(lambda tx: _open(ds, tx[1], ["source_row"] if tx[0] == "quarantine"
                                                                       else None), others)):
            if part.error is not None:
                p.append(f"{table}: unreadable part {posixpath.basename(x)} ({part.error})")
                continue
            rows[table] += part.rows
            part_rows[x] = part.rows
            if table == "quarantine":  # the input quarantine: rows set aside before planning
                set_aside += part.rows
                rows_seen.append(part.table.column("source_row").to_numpy(zero_copy_only=False))
        # 3. Shard by shard, a few at a time, read concurrently and merged in plan order.
        failed = {f["shard_id"] for f in manifest["shards"]["failed"]}
        acc = Counter()
        shards = list(by_shard.items())
        for lo in range(0, len(shards), 256):
            for shard in pool.map(lambda sp: _check_shard(ds, sp[0], sp[1], layout, failed), shards[lo : lo + 256]):
                p.extend(shard.problems)
                acc.update(shard.acc)
                rows.update(shard.rows)
                part_rows |= {by_shard[shard.shard_id][t]: n for t, n in shard.rows.items()}
                rows_seen.append(shard.source_rows)
                dup_ids += [i for i, new in zip(shard.ids, seen_ids.add_many(shard.ids)) if not new]
    if any("unreadable part" in x for x in p):
        return v  # the counts below would only repeat it
    _check_compacts(ds, manifest, part_rows, p)
    for table, entry in manifest["tables"].items():
        if rows[table] != entry["rows"]:
            p.append(f"{table}: the manifest says {entry['rows']} rows, the files hold {rows[table]}")

    # The source rows, all together (8 bytes each): each exactly once.
    _too_many(p, "prompt ids planned more than once", dup_ids)
    all_rows = np.concatenate(rows_seen) if rows_seen else np.empty(0, dtype=np.int64)
    out_of_range = all_rows[(all_rows < 0) | (all_rows >= source_rows)]
    _too_many(p, "source rows outside the input", out_of_range.tolist())
    seen = np.bincount(all_rows[(all_rows >= 0) & (all_rows < source_rows)], minlength=source_rows)
    _too_many(p, "source rows accounted for more than once", np.flatnonzero(seen > 1).tolist())
    _too_many(p, "source rows missing (neither planned nor set aside)", np.flatnonzero(seen == 0).tolist())

    # 4. The manifest's accounting against the recomputed one.
    recomputed = {"source_rows": source_rows, "set_aside_at_input": set_aside,
                  "planned_prompts": acc["planned_prompts"],
                  **{k: acc[k] for k in ("prompts_with_output", "prompts_quarantined_in_shards",
                                          "prompts_in_failed_shards", "prompts_in_unbuilt_shards")}}
    for k, value in recomputed.items():
        if manifest["accounting"].get(k) != value:
            p.append(f"accounting: the manifest says {k} = {manifest['accounting'].get(k)}, the files say {value}")
    if not manifest["accounting"].get("balanced"):
        p.append("accounting: the manifest's counts do not add up (balanced: false)")
    if v.status == "complete" and (failed or recomputed["prompts_in_unbuilt_shards"]):
        p.append("the manifest says complete but some shards failed or were never built")
    v.counts = recomputed
    return v
