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
import logging
import posixpath

import pyarrow.parquet as pq

from dafactory.tasks.io.schemas import TABLES, conform
from dafactory.tasks.io.storage import DatasetDir, part_key, part_name

log = logging.getLogger(__name__)

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
    written concurrently. Returns part path -> compact path, both paths in the dataset."""
    todo, member_of = [], {}
    for table, found in grouped.items():
        there = {e["name"] for e in ds.listing(table)} if found else set()
        for members in found:
            path = compact_path(table, members)
            member_of |= {m: path for m in members}
            if posixpath.basename(path) not in there:
                todo.append((table, path, members))
    ds.concurrently(lambda job: write_group(ds, *job), todo)
    return member_of


def write_group(ds: DatasetDir, table: str, path: str, members: list[str]) -> None:
    """One compact file: its members' rows in order, a row group per member with rows, read one member at
    a time (memory: one part, whatever the group's size)."""
    schema = TABLES[table]

    def write(f):
        with pq.ParquetWriter(f, schema, compression="zstd") as writer:
            for member in members:
                data = conform(ds.read_file(ds._inside(member)), table)
                if data.num_rows:
                    writer.write_table(data.cast(schema))

    ds._put(ds._inside(path), write)


class Compactor:
    """Compaction during the build: a group's compact files are written on one background thread as soon
    as every shard of the group is written (or resumed), so that finalize finds them there and only the
    last groups wait. Only an optimisation: finalize compacts whatever it lists that is not there yet
    (a failed shard's group, another run's parts), and a compact file's name is its members'."""

    def __init__(self, ds: DatasetDir, shards: list, tables: list[str], size: int):
        from concurrent.futures import ThreadPoolExecutor

        # every shard writes a part of each table but the quarantine (none when empty): finalize does that one
        self.ds, self.size, self.tables = ds, size, [*(t for t in tables if t != "quarantine"), "prompts"]
        self.shards = shards  # ShardRef in plan order
        self.active = size >= 1 and len(shards) > size
        self.pos = {s.shard_id: i for i, s in enumerate(shards)}
        self.parts: dict[int, str] = {}
        self.left = {g: min(size, len(shards) - g * size) for g in range(0, -(-len(shards) // max(size, 1)))}
        self.there = {t: {e["name"] for e in ds.listing(t)} for t in self.tables} if self.active else {}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="compact") if self.active else None
        self.futures: list = []

    def done(self, shard_id: str, part: str) -> None:
        """A shard's parts are written under this name (this run's, or the resumed ones)."""
        i = self.pos.get(shard_id)
        if not self.active or i is None or i in self.parts:
            return
        self.parts[i] = part
        g = i // self.size
        self.left[g] -= 1
        if self.left[g] or min(self.size, len(self.shards) - g * self.size) < 2:
            return
        span = range(g * self.size, min((g + 1) * self.size, len(self.shards)))
        for table in self.tables:
            names = [self.shards[p].part if table == "prompts" else self.parts[p] for p in span]
            members = [f"{table}/part-{n}.parquet" for n in names]
            path = compact_path(table, members)
            if posixpath.basename(path) not in self.there[table]:
                self.futures.append(self.pool.submit(write_group, self.ds, table, path, members))

    def wait(self) -> int:
        """Wait for the compactions in flight; returns how many were written. One that failed is left to
        finalize (logged here)."""
        if self.pool is None:
            return 0
        written = 0
        for f in self.futures:
            try:
                f.result()
                written += 1
            except Exception as exc:  # finalize writes it again
                log.warning("compaction during the build failed (finalize retries it): %s", exc)
        self.pool.shutdown()
        return written


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
