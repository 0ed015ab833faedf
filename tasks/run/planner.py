"""The planner: the whole input, streamed, cut into shards by content (Plan, Planner). Pure: pyarrow and the
store, no Prefect or Ray.

Invariants: a prompt's shard depends only on its id (and the number of id ranges, kept by the next build of
the folder), so a reordered input plans the same shards and an edit changes only the shards of the prompts
it touches; a shard's id hashes everything that decides its rows (see Planner._shard); the input is held
whole neither in memory nor on the store.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dafactory.tasks.io.prompts import PromptRow, PromptSet, add_late, bucket_of, choose_buckets, id_hashes, shard_id_of
from dafactory.tasks.io.schemas import PROMPTS, QUARANTINE, to_table
from dafactory.tasks.io.storage import DatasetDir, ShardRef, failpoint


@dataclass
class Plan:
    shards: list[ShardRef] = field(default_factory=list)
    source_rows: int = 0
    duplicates: int = 0
    quarantined: Counter = field(default_factory=Counter)  # input rows set aside, by reason
    quarantine_parts: list[str] = field(default_factory=list)
    buckets: int = 0  # id ranges the prompts were cut into (kept by the next build of the folder)
    screened: dict = field(default_factory=dict)  # what the screen set aside, by rule (see tasks/screen/rules.py)

    @property
    def unique(self) -> int:
        return sum(s.prompts for s in self.shards)


class Planner:
    """Plans the input into shards by content, streaming it: every unique prompt goes to the shard of
    the id range its prompt id falls in (about `shard_size` prompts per range; see choose_buckets), so
    a reordered input plans the same shards and an edit changes only the shards of the prompts it
    touches. Within a shard, prompts are in id order.

    The input is held whole neither in memory nor on the store: batches are split by id range into
    2**GROUP_BITS spill files on local disk, then each file is read alone, cut into shards, and each shard's
    prompts staged (with the input quarantine) in the dataset's `prompts` table."""

    GROUP_BITS = 6  # 64 spill files, each an equal range of ids (their top bits)

    def __init__(self, ds: DatasetDir, shard_size: int, salt: str, previous_buckets: int | None = None,
                 quarantine_rows: int = 50_000):
        self.ds, self.shard_size, self.salt, self.quarantine_rows = ds, shard_size, salt, quarantine_rows
        self.previous_buckets = previous_buckets
        self.plan, self.quarantine, self.unique = Plan(), [], 0
        # parts an earlier plan of the same content wrote (one listing each): not uploaded again
        self.existing = {t: set(ds.parts(t)) for t in ("prompts", "quarantine")}
        self.spill = tempfile.TemporaryDirectory(prefix="dafactory-plan-")
        self.writers: dict[int, pa.ipc.RecordBatchFileWriter] = {}
        # Categories that repeats brought to prompts already spilled (iter_prompts' `late`): added when
        # their spill file is read back, so that the input is read once.
        self.late: dict[str, tuple[str, ...]] = {}

    def add(self, batch: PromptSet) -> None:
        self.plan.source_rows += batch.source_rows
        self.plan.duplicates += batch.duplicates
        self.plan.quarantined.update(q["reason"] for q in batch.quarantine)
        self.quarantine += batch.quarantine
        if batch.rows:
            self._spill(batch.rows)
        if len(self.quarantine) >= self.quarantine_rows:
            self._quarantine()

    def _spill(self, rows: list[PromptRow]) -> None:
        h = id_hashes([r.prompt_id for r in rows])
        table = pa.table({
            "h": h, "prompt_id": [r.prompt_id for r in rows], "source_row": [r.source_row for r in rows],
            "prompt": [r.prompt for r in rows], "category": [r.category for r in rows],
            "categories": [list(r.categories) for r in rows],
            "reference": [None if r.reference is None else json.dumps(r.reference) for r in rows],
            "max_new_tokens": [r.max_new_tokens for r in rows],
        }, schema=SPILL)
        groups = h >> np.uint64(64 - self.GROUP_BITS)
        for g in np.unique(groups).tolist():
            if g not in self.writers:
                self.writers[g] = pa.ipc.new_file(os.path.join(self.spill.name, f"{g:02d}.arrow"), SPILL)
            self.writers[g].write_table(table.filter(pa.array(groups == g)))
        self.unique += len(rows)

    def _shard(self, rows: pa.Table) -> None:
        # what decides a shard's rows besides the salt (model, sampling, spec, template): each prompt's id,
        # its categories (the teacher's policy, the rows' category), its reference (utility scoring) and its own
        # max_new_tokens (in the key only when it has one: the shards of folders planned before keep their ids)
        keys = [f"{pid}\x1f{chr(30).join(cats or ())}\x1f{ref or ''}" + (f"\x1f{budget}" if budget else "")
                for pid, cats, ref, budget in zip(
                    rows.column("prompt_id").to_pylist(), rows.column("categories").to_pylist(),
                    rows.column("reference").to_pylist(), rows.column("max_new_tokens").to_pylist())]
        shard_id = shard_id_of(self.salt, keys)
        part = self.ds.write_keyed("prompts", shard_id, rows.drop_columns(["h"]).append_column(
            "shard_id", pa.array([shard_id] * rows.num_rows, pa.string())), self.existing["prompts"])
        self.plan.shards.append(ShardRef(shard_id, len(self.plan.shards), rows.num_rows, part))
        failpoint("plan")

    def _add_late(self, table: pa.Table) -> pa.Table:
        if not self.late:
            return table
        ids = table.column("prompt_id").to_pylist()
        hits = [j for j, pid in enumerate(ids) if pid in self.late]
        if not hits:
            return table
        cats, joined = table.column("categories").to_pylist(), table.column("category").to_pylist()
        for j in hits:
            merged, joined[j] = add_late(tuple(cats[j] or ()), self.late[ids[j]])
            cats[j] = list(merged)
        table = table.set_column(table.schema.get_field_index("categories"), "categories",
                                 pa.array(cats, table.schema.field("categories").type))
        return table.set_column(table.schema.get_field_index("category"), "category",
                                pa.array(joined, table.schema.field("category").type))

    def _quarantine(self) -> None:
        key = f"input-{len(self.plan.quarantine_parts):05d}"
        self.plan.quarantine_parts.append(self.ds.write_keyed("quarantine", key, to_table(self.quarantine, QUARANTINE),
                                                              self.existing["quarantine"]))
        self.quarantine = []

    def finish(self) -> Plan:
        for writer in self.writers.values():
            writer.close()
        self.plan.buckets = choose_buckets(self.unique, self.shard_size, self.previous_buckets)
        carry = None  # the last bucket of a group file may go on in the next one (same id range)
        for g in sorted(self.writers):
            with pa.memory_map(os.path.join(self.spill.name, f"{g:02d}.arrow")) as source:
                table = pa.ipc.open_file(source).read_all()
            table = self._add_late(table if carry is None else pa.concat_tables([carry, table]))
            table = table.take(pc.sort_indices(table, [("h", "ascending")]))
            buckets = bucket_of(table.column("h").to_numpy(), self.plan.buckets)
            starts = [0, *(np.flatnonzero(np.diff(buckets)) + 1).tolist()]
            for lo, hi in zip(starts[:-1], starts[1:]):
                self._shard(table.slice(lo, hi - lo))
            carry = table.slice(starts[-1])
        if carry is not None:
            self._shard(carry)
        self.spill.cleanup()
        if self.quarantine or not self.plan.quarantine_parts:
            self._quarantine()
        return self.plan


# A planned prompt on its way through the spill files: PROMPTS without shard_id, with the id as uint64.
SPILL = pa.schema([("h", pa.uint64()), *(f for f in PROMPTS if f.name != "shard_id")])
