"""Compaction for readers: Delta Lake's OPTIMIZE, so that the dataset card of a 10M-prompt build names a
few thousand files instead of 780k. Pure: no Prefect, Ray or torch.

A version lists every shard's parts (resume, verify and vacuum go by them). When a table has more than
`size` parts, consecutive shards (in plan order, which is prompt-id order) are grouped `size` at a time,
and each group's parts are also written as one compact file, `<table>/compact-<hash>.parquet`. The hash
is of the members' names, and members never change (storage.py), so a compact file's name says exactly
which rows it holds: it is written once, skipped when it is already there (an unchanged group of an
incremental rebuild, or another run's), and a crash mid-way leaves a file no version lists, which
vacuum removes. The version's parts table names each part's compact file; the dataset card lists the
compact files and the parts left outside any group, so `datasets` reads every row exactly once.
"""

from __future__ import annotations

import hashlib
import posixpath

import pyarrow as pa

from dafactory.tasks.io.schemas import TABLES
from dafactory.tasks.io.storage import DatasetDir, part_key, part_name, write_parquet

PREFIX = "compact-"


def compact_path(table: str, members: list[str]) -> str:
    """The compact file (path in the dataset) that holds these parts' rows, in this order."""
    key = hashlib.sha256("\n".join(members).encode()).hexdigest()[:16]
    return f"{table}/{PREFIX}{key}.parquet"


def is_compact(name: str) -> bool:
    return name.startswith(PREFIX) and name.endswith(".parquet")


def groups(files: dict[str, list[str]], order: dict[str, int], size: int) -> dict[str, list[list[str]]]:
    """table -> its groups of part files (paths in the dataset) to compact: the parts of shards `size`
    consecutive plan positions apart share a group, so that changing one shard rebuilds one group. Only
    tables with more than `size` parts, only the shards' parts (`order`: shard id -> plan position;
    input quarantine and summaries stay as they are) and only groups of two or more parts."""
    out: dict[str, list[list[str]]] = {}
    if size < 1:
        return out
    for table, paths in files.items():
        if len(paths) <= size:
            continue
        by_group: dict[int, list[tuple[int, str]]] = {}
        for path in paths:
            pos = order.get(part_key(part_name(path)))
            if pos is not None:
                by_group.setdefault(pos // size, []).append((pos, path))
        found = [[p for _, p in sorted(members)] for _, members in sorted(by_group.items())]
        out[table] = [g for g in found if len(g) > 1]
    return out


def write_compacts(ds: DatasetDir, grouped: dict[str, list[list[str]]]) -> dict[str, str]:
    """Write each group's compact file unless it is already there (one listing per table); groups are
    read and written concurrently. Returns part path -> compact path, both paths in the dataset."""
    todo, member_of = [], {}
    for table, found in grouped.items():
        there = {e["name"] for e in ds.listing(table)} if found else set()
        for members in found:
            path = compact_path(table, members)
            member_of |= {m: path for m in members}
            if posixpath.basename(path) not in there:
                todo.append((table, path, members))

    def one(job):
        table, path, members = job
        data = pa.concat_tables([_read(ds, m) for m in members]).cast(TABLES[table])
        ds._put(ds._inside(path), lambda f: write_parquet(data, f))

    ds.concurrently(one, todo)
    return member_of


def _read(ds: DatasetDir, rel: str) -> pa.Table:
    def read():
        with ds.parquet(ds._inside(rel)) as pf:
            return pf.read(use_threads=False).replace_schema_metadata(None)

    return ds._retry(f"read {rel}", read)


def reader_files(files: dict[str, list[str]], compact: dict[str, str]) -> dict[str, list[str]]:
    """table -> the files a reader reads for every row once: each compact file (at its first member's
    place) instead of its members, and the parts in no compact file."""
    out = {}
    for table, paths in files.items():
        seen: dict[str, None] = {}
        for path in paths:
            seen[compact.get(path, path)] = None
        out[table] = list(seen)
    return out
