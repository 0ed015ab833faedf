"""Dataset layout on local disk or any fsspec filesystem (s3:// through s3fs): same code path.

<output>/<dataset>/
  config.json                  the config that owns this folder (written first)
  candidates/part-<shard>.parquet   (preference) all N per prompt, with scores (written last per shard)
  pairs/part-<shard>.parquet        TRL conversational preference rows
  best/part-<shard>.parquet         TRL conversational prompt-completion rows
  train/, filtered/                 (distill) kept and excluded samples (filtered written last)
  quarantine/part-<...>.parquet     input rows that never reached a model, with reasons
  manifest.json                written last; its presence means the dataset is complete

On local disk a part is written under a temporary name and renamed into place; on object stores (S3)
a single PUT is already atomic, so parts go straight to their key. Either way a reader never sees half a
part. Shard part names are content hashes, so re-running a shard overwrites it instead of duplicating
it. The manifest, written last with exclusive create, lists every part of every table: readers trust
only parts the manifest lists, so a run in progress or a failed run is never read as a dataset.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.errors import UserError
from tasks.schemas import TABLES

STATS_KEY = b"dafactory.shard_stats"
MANIFEST = "manifest.json"
CONFIG = "config.json"


def storage_options(uri: str, timeout_s: float) -> dict:
    """Timeouts for remote stores, so that an unreachable endpoint fails instead of hanging.
    Credentials are never passed here: they come from the standard AWS environment or profile."""
    if uri.startswith(("s3://", "s3a://")):
        return {"config_kwargs": {"connect_timeout": timeout_s, "read_timeout": timeout_s,
                                  "retries": {"max_attempts": 2}}}
    return {}


class DatasetDir:
    def __init__(self, output: str, dataset: str, timeout_s: float = 30):
        self.uri = output.rstrip("/") + "/" + dataset
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **storage_options(self.uri, timeout_s))
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _put(self, final: str, write) -> None:
        """Write atomically: temp file + rename on local disk, one PUT on object stores."""
        if not self.local:
            # No makedirs on object stores: s3fs would create a missing bucket instead of failing.
            with self.fs.open(final, "wb") as f:
                write(f)
            return
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        tmp = final + f".tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open(tmp, "wb") as f:
            write(f)
        self.fs.mv(tmp, final)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._put(self._path(rel), lambda f: f.write(data))

    def check_writable(self) -> None:
        """Fail before any model loads when the output cannot be written (missing bucket, no rights,
        unreachable endpoint)."""
        probe = self._path(f".write-probe-{uuid.uuid4().hex[:8]}")
        try:
            self.write_bytes(posixpath.relpath(probe, self.root), b"")
            self.fs.rm(probe)
        except Exception as exc:  # any storage failure is the user's output setting
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot write to output {self.uri}: {first}") from None

    def _read_json(self, rel: str) -> dict | None:
        path = self._path(rel)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            return json.load(f)

    # ownership -------------------------------------------------------------------------------
    def check_owner(self, fingerprint: str) -> None:
        """Refuse an output that already holds a dataset built with a different config."""
        existing = self._read_json(CONFIG)
        if existing is not None and existing.get("fingerprint") != fingerprint:
            raise UserError(
                f"output {self.uri} already holds a dataset built with a different config "
                f"(fingerprint {existing.get('fingerprint')}, this run {fingerprint}); "
                "use another dataset name or output"
            )

    def claim(self, fingerprint: str, config: dict) -> None:
        self.check_owner(fingerprint)
        # A run in progress must never be mistaken for a complete dataset.
        if self.fs.exists(self._path(MANIFEST)):
            self.fs.rm(self._path(MANIFEST))
        self.write_bytes(CONFIG, json.dumps({"fingerprint": fingerprint, "config": config}, indent=2).encode())

    # parts -----------------------------------------------------------------------------------
    def part_path(self, table: str, part: str) -> str:
        return self._path(table, f"part-{part}.parquet")

    def write_part(self, table: str, part: str, data: pa.Table, stats: dict | None = None) -> None:
        data = data.cast(TABLES[table])
        if stats is not None:
            data = data.replace_schema_metadata({STATS_KEY: json.dumps(stats).encode()})
        self._put(self.part_path(table, part), lambda f: pq.write_table(data, f, compression="zstd"))

    def shard_done(self, shard_id: str, marker: str) -> bool:
        """`marker` is the table a shard writes last: its part's presence marks the shard complete."""
        return self.fs.exists(self.part_path(marker, shard_id))

    def parts(self, table: str) -> dict[str, str]:
        """part name -> path, for finished parts only."""
        pattern = self._path(table, "part-*.parquet")
        return {
            posixpath.basename(p)[len("part-") : -len(".parquet")]: p for p in sorted(self.fs.glob(pattern))
        }

    def prune(self, keep: set[str], tables: list[str]) -> int:
        """Remove shard parts not in `keep` (left over from an earlier version of the input)."""
        removed = 0
        for table in tables:
            for part, path in self.parts(table).items():
                if part not in keep:
                    self.fs.rm(path)
                    removed += 1
        for table in TABLES:  # leftovers of interrupted writes
            for path in self.fs.glob(self._path(table, "*.tmp-*")):
                self.fs.rm(path)
        return removed

    def footer(self, path: str) -> pq.FileMetaData:
        with self.fs.open(path, "rb") as f:
            return pq.ParquetFile(f).metadata

    def shard_stats(self, marker: str) -> list[dict]:
        out = []
        for path in self.parts(marker).values():
            meta = self.footer(path).metadata or {}
            out.append(json.loads(meta.get(STATS_KEY, b"{}")))
        return out

    def row_counts(self, tables: list[str]) -> dict[str, dict]:
        """Rows and the exact part files of each table (what the manifest lists for readers)."""
        counts = {}
        for table in tables:
            paths = list(self.parts(table).values())
            rows = [self.footer(p).num_rows for p in paths]
            counts[table] = {"rows": sum(rows), "parts": len(paths),
                             "files": [f"{table}/{posixpath.basename(p)}" for p in paths]}
        return counts

    def read_table(self, table: str) -> pa.Table:
        """The table's parts: those the manifest lists when there is one, else what is on disk."""
        manifest = self.read_manifest()
        listed = (manifest or {}).get("tables", {}).get(table, {}).get("files")
        if listed is not None:  # manifests before 0.1 list no files: read what is on disk
            paths = [self._path(f) for f in listed]
        else:
            paths = list(self.parts(table).values())
        if not paths:
            return TABLES[table].empty_table()
        tables = []
        for p in paths:
            with self.fs.open(p, "rb") as f:
                # use_threads=False: pyarrow 26 reading from Python file objects with threads can abort the
                # process at exit ("terminate called without an active exception"); parts are small.
                tables.append(pq.read_table(f, use_threads=False).replace_schema_metadata(None))
        return pa.concat_tables(tables)

    # manifest --------------------------------------------------------------------------------
    def write_manifest(self, manifest: dict) -> None:
        """Exclusive create: two runs finishing into one folder cannot both claim it."""
        data = json.dumps(manifest, indent=2, default=str).encode()
        final = self._path(MANIFEST)
        if not self.local:
            with self.fs.open(final, "xb") as f:  # a conditional PUT (If-None-Match) on S3
                f.write(data)
            return
        tmp = final + f".tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, final)  # atomic, and fails if the manifest exists
        finally:
            self.fs.rm(tmp)

    def read_manifest(self) -> dict | None:
        return self._read_json(MANIFEST)
