"""`dafactory verify`: recompute a dataset's accounting from its files alone and compare it with the
manifest. Pure: no Prefect, Ray or torch.

What it proves, shard by shard, reading only the part files the manifest lists:
- every source row of the input is in exactly one place: the `prompts` table (planned) or the input
  quarantine (set aside with a reason); no row is missing and none is there twice;
- every planned prompt of a built shard has output rows or a quarantine row with a reason (never
  both, never neither); a prompt of a failed or unbuilt shard has neither;
- no key is duplicated: prompt ids across the plan, (prompt_id, sample_idx) across the sample tables,
  prompt_id within pairs/best;
- every part the version lists exists and is readable, and every shard with a marker has every
  table's part (or its marker's stats say that table had 0 rows), with the rows the stats say;
- the manifest's row counts and accounting equal what the files say.

It checks the current version (the highest readable one in `_versions/`, whatever `manifest.json`
says) and notes, without failing, what a reader never sees: unreadable version files and files in a
table's folder that are not parts.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from dafactory.tasks.io.prompts import SeenIds
from dafactory.tasks.io.commit import read_version, version_files
from dafactory.tasks.io.storage import STATS_KEY, DatasetDir, part_key

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
    """The key a part stands for: its shard id (or input-..., summary), without a run token."""
    return part_key(posixpath.basename(path)[len("part-") : -len(".parquet")])


def _by_part(ds: DatasetDir, manifest: dict, table: str) -> dict[str, str]:
    return {_part_name(p): p for p in ds.listed_files(table, manifest)} if table in manifest["tables"] else {}


def _by_full_name(ds: DatasetDir, manifest: dict, table: str) -> dict[str, str]:
    return {posixpath.basename(p)[len("part-") : -len(".parquet")]: p for p in ds.listed_files(table, manifest)}


def _footers(ds: DatasetDir, paths: list[str]) -> list:
    """Each part's footer, or the exception reading it raised (a truncated part)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(path):
        try:
            return ds.footer(path)
        except Exception as exc:  # named as a problem, not raised
            return exc

    with ThreadPoolExecutor(max(1, min(32, len(paths)))) as pool:
        return list(pool.map(one, paths))


def _notes(ds: DatasetDir, manifest: dict, notes: list[str]) -> None:
    """Unreadable version files, and files in the version's table folders that are not parts."""
    for e in version_files(ds):
        if e["version"] > manifest["version"] or (e["version"] != manifest["version"]
                                                  and read_version(ds, e["version"]) is None):
            notes.append(f"_versions/{e['name']}: unreadable version file, skipped (never current)")
    for table in manifest["tables"]:
        for e in ds.listing(table):
            if not (e["name"].startswith("part-") and e["name"].endswith(".parquet")):
                notes.append(f"{table}/{e['name']}: not a part (no version lists it; vacuum removes it)")


def _ids(table: pa.Table) -> list:
    return table.column("prompt_id").to_pylist()


def _too_many(problems: list[str], what: str, items) -> None:
    items = sorted(map(str, items))
    if items:
        problems.append(f"{what}: {len(items)} ({', '.join(items[:3])}{', ...' if len(items) > 3 else ''})")


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

    # 1. Files and row counts (one listing per table, then the footers, read concurrently).
    footers = {}
    for table, entry in manifest["tables"].items():
        paths = ds.listed_files(table, manifest)
        there = {e["path"] for e in ds.listing(table)} if paths else set()
        missing = [x for x in paths if x not in there]
        _too_many(p, f"{table}: files the manifest lists but that do not exist", missing)
        present = [x for x in paths if x in there]
        for x, meta in zip(present, _footers(ds, present)):
            if isinstance(meta, Exception):
                p.append(f"{table}: unreadable part {posixpath.basename(x)} ({str(meta).splitlines()[0][:120]})")
            else:
                footers[x] = meta
        rows = sum(footers[x].num_rows for x in present if x in footers)
        if rows != entry["rows"]:
            p.append(f"{table}: the manifest says {entry['rows']} rows, the files hold {rows}")
    if any(x not in footers for t in manifest["tables"] for x in ds.listed_files(t, manifest)):
        v.counts = {}
        return v  # a part is missing or unreadable: the shard-by-shard checks below would only repeat it

    # Every shard with a marker has each table's part, with the rows its marker's stats say.
    marker_name = layout["marker"]
    for name, path in _by_full_name(ds, manifest, marker_name).items():
        stats = json.loads((footers[path].metadata or {}).get(STATS_KEY, b"{}"))
        for table in layout.get("tables", []):
            listed = _by_full_name(ds, manifest, table)
            want = stats.get("rows", {}).get(table)
            have = footers[listed[name]].num_rows if name in listed else None
            if have is None and want:
                p.append(f"shard {part_key(name)}: its marker says {want} {table} rows, the version lists no part")
            elif have is not None and want is not None and have != want:
                p.append(f"shard {part_key(name)}: its marker says {want} {table} rows, the part holds {have}")

    # 2. Every source row exactly once: planned (below), or set aside at input.
    plan_parts = _by_part(ds, manifest, "prompts")
    quarantine_parts = _by_part(ds, manifest, "quarantine")
    source_rows = manifest["accounting"]["source_rows"]
    rows_seen, seen_ids, dup_ids = [], SeenIds(), []
    set_aside = 0
    for name, path in quarantine_parts.items():
        if name.startswith("input"):
            q = ds.read_file(path)
            set_aside += q.num_rows
            rows_seen.append(q.column("source_row").to_numpy(zero_copy_only=False))
    # 3. Shard by shard (one shard in memory at a time): every planned prompt has output or a quarantine
    # row, and no key is there twice.
    sample_parts = {t: _by_part(ds, manifest, t) for t in layout["sample_tables"]}
    unique_parts = {t: _by_part(ds, manifest, t) for t in layout.get("one_row_per_prompt", [])}
    marker = _by_part(ds, manifest, layout["marker"])
    failed = {f["shard_id"] for f in manifest["shards"]["failed"]}
    acc = Counter()
    for shard_id, path in plan_parts.items():
        t = ds.read_file(path)
        rows_seen.append(t.column("source_row").to_numpy(zero_copy_only=False))
        ids = set(_ids(t))
        acc["planned_prompts"] += t.num_rows
        dup_ids += [i for i in _ids(t) if not seen_ids.add(i)]
        out, keys = set(), Counter()
        for table, parts in sample_parts.items():
            if shard_id in parts:
                part = ds.read_file(parts[shard_id])
                out.update(_ids(part))
                keys.update(zip(_ids(part), part.column("sample_idx").to_pylist()))
        quarantined = Counter()
        if shard_id in quarantine_parts:
            quarantined.update(_ids(ds.read_file(quarantine_parts[shard_id])))
        _too_many(p, f"shard {shard_id}: (prompt_id, sample_idx) written twice",
                  [k for k, n in keys.items() if n > 1])
        _too_many(p, f"shard {shard_id}: prompts quarantined twice", [k for k, n in quarantined.items() if n > 1])
        _too_many(p, f"shard {shard_id}: prompts both in output and quarantine", out & set(quarantined))
        _too_many(p, f"shard {shard_id}: rows for prompts not planned in it", (out | set(quarantined)) - ids)
        for table, parts in unique_parts.items():
            if shard_id in parts:
                c = Counter(_ids(ds.read_file(parts[shard_id])))
                _too_many(p, f"shard {shard_id}: {table} rows twice for a prompt", [k for k, n in c.items() if n > 1])
                _too_many(p, f"shard {shard_id}: {table} rows for prompts without output", set(c) - out)
        if shard_id in marker:
            _too_many(p, f"shard {shard_id}: prompts missing (no output, no quarantine)", ids - out - set(quarantined))
            acc["prompts_with_output"] += len(out)
            acc["prompts_quarantined_in_shards"] += len(quarantined)
        elif shard_id in failed:
            acc["prompts_in_failed_shards"] += len(ids)
        else:
            acc["prompts_in_unbuilt_shards"] += len(ids)
        if shard_id not in marker and (out or quarantined):
            p.append(f"shard {shard_id}: not marked done but has output or quarantine rows")

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
