"""Dataset layout on local disk or any fsspec filesystem (s3:// through s3fs): same code path.

<output>/<dataset>/
  config.json                  the config that owns this folder (written first)
  _staging/<table>/part-*.parquet   parts of a run in progress (every write goes here first)
  prompts/part-<shard>@<hash>.parquet   the planned input: each unique prompt, its source row and shard
  candidates/part-<shard>.parquet   (preference) all N per prompt, with scores (written last per shard)
  pairs/part-<shard>.parquet        TRL conversational preference rows
  best/part-<shard>.parquet         TRL conversational prompt-completion rows
  train/, filtered/                 (distill) kept and excluded samples (filtered written last)
  quarantine/part-<...>.parquet     input rows that never reached a model, with reasons
  manifest.json                written last; "status": "complete" means every shard is in
  _versions/manifest-<n>.json  every committed manifest (the last `keep_versions` + 1 are kept)
  README.md                    dataset card: `configs:` front matter naming exactly the manifest's parts

A run writes every part under _staging/ (on local disk under a temporary name renamed into place; on
object stores one PUT, already atomic), so a reader never sees half a part. Finishing a run publishes
the staged parts into their tables and then commits the manifest (see commit_manifest); it lists every
part of every table, and readers trust only parts a manifest lists. Shard part names are content
hashes, so re-running a shard overwrites it instead of duplicating it, and a part already staged or
published marks its shard done (resume). Every store operation is retried with exponential backoff;
when the store stays down the run fails with StorageError and no manifest.

A rebuild never takes the last good version away: published parts are never overwritten (parts whose
content can change under the same key, the planned prompts, the input quarantine and summaries, carry
a hash of their content after `@`, so the same content keeps its name), the new manifest replaces the old one in one atomic step, and only then are
the parts that only older versions list removed. Until that step the folder holds the previous manifest
and every part it lists; a rebuild that fails or is stopped leaves its parts staged for the re-run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time
import uuid
from collections import Counter
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from dafactory.tasks.errors import StorageError, UserError, first_line
from dafactory.tasks.io.schemas import TABLES

log = logging.getLogger(__name__)

STATS_KEY = b"dafactory.shard_stats"
MANIFEST = "manifest.json"
CONFIG = "config.json"
STAGING = "_staging"
VERSIONS = "_versions"
REBUILD = "rebuild.json"  # in _staging/: what a failed or stopped rebuild got to (the last version stands)
FAILPOINT = "DAFACTORY_FAILPOINT"


def failpoint(name: str) -> None:
    """Kill this process outright (SIGKILL) when the environment names this point: how the tests prove
    that a crash at any step of a rebuild leaves the last version readable. A no-op otherwise."""
    if os.environ.get(FAILPOINT) == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def part_key(name: str) -> str:
    """The shard id (or `input-...`, `summary`) a part name stands for, without the run token."""
    return name.split("@", 1)[0]


CREDENTIAL_KEYS = {"aws_access_key_id": "key", "aws_secret_access_key": "secret", "aws_session_token": "token"}
CLIENT_KEYS = ("endpoint_url", "region_name")
# botocore credential sources that renew themselves: never frozen into what replicas are sent
REFRESHING = {"iam-role", "container-role", "assume-role", "assume-role-with-web-identity", "sso",
              "custom-process"}


def storage_options(uri: str, timeout_s: float, credentials: dict | None = None) -> dict:
    """Timeouts for remote stores, so that an unreachable endpoint fails instead of hanging. Credentials
    come from the standard AWS environment or profile, or from `credentials` (a Prefect Secret block's
    value, see credentials_from_block); they live only in the filesystem object, never in what is written."""
    if not uri.startswith(("s3://", "s3a://")):
        return {}
    # A filesystem of its own: fsspec's shared instance would keep credentials and endpoints of an
    # earlier run (rotated keys, another block) for the life of a serving process.
    options = {"config_kwargs": {"connect_timeout": timeout_s, "read_timeout": timeout_s,
                                 "retries": {"max_attempts": 2}}, "skip_instance_cache": True}
    creds = credentials or {}
    options |= {fs_key: creds[k] for k, fs_key in CREDENTIAL_KEYS.items() if creds.get(k)}
    client = {k: creds[k] for k in CLIENT_KEYS if creds.get(k)}
    return options | ({"client_kwargs": client} if client else {})


def credentials_from_block(name: str) -> dict:
    """The value of the Prefect Secret block `name`: a JSON object with aws_access_key_id,
    aws_secret_access_key and optionally aws_session_token, endpoint_url, region_name."""
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except ValueError as exc:
        raise UserError(f"storage_block: no Prefect Secret block named {name!r} ({str(exc)[:80]})") from None
    allowed = set(CREDENTIAL_KEYS) | set(CLIENT_KEYS)
    if not isinstance(value, dict) or not value.get("aws_access_key_id") or set(value) - allowed:
        raise UserError(f"storage_block: the Secret block {name!r} must hold a JSON object with keys "
                        f"from {sorted(allowed)}, aws_access_key_id and aws_secret_access_key at least")
    return value


@dataclass(frozen=True)
class ShardRef:
    """A planned shard: its prompts live in the dataset's `prompts` table, read when the shard runs."""

    shard_id: str
    index: int
    prompts: int
    part: str  # its part in the `prompts` table: the shard id and a hash of the part's content


def load_shard(ds: "DatasetDir", ref: ShardRef):
    """The shard's prompts, as the first stage gets them."""
    from dafactory.tasks.io.prompts import PromptRow, Shard

    rows = ds.read_part("prompts", ref.part).to_pylist()
    return Shard(ref.shard_id, ref.index, tuple(
        PromptRow(r["prompt_id"], r["prompt"], r["category"], r["source_row"], tuple(r["categories"] or ()),
                  None if r["reference"] is None else tuple(json.loads(r["reference"])))
        for r in rows
    ))


@dataclass(frozen=True)
class ShardReader:
    """Given to the first stage's replicas: they read their shard's prompts themselves, so that the driver
    sends each shard as a reference of a few bytes instead of reading, pickling and sending its rows."""

    ds: "DatasetDir"

    def in_replica(self, ref: ShardRef):
        """The shard's Shard, read here; None when this node cannot see the output (a local folder on another
        node's disk): the driver then reads it and sends the rows."""
        if self.ds.local and not self.ds.fs.exists(self.ds._path(CONFIG)):
            return None
        return load_shard(self.ds, ref)


@dataclass(frozen=True)
class ShardWriter:
    """Stages one shard's parts, the marker table (the last of `tables`) last, with the shard's stats in
    the marker's footer; returns the stats."""

    ds: "DatasetDir"
    tables: tuple[str, ...]
    sample_tables: tuple[str, ...]

    def __call__(self, result: dict) -> dict:
        tables = result["tables"]
        out_ids = set()
        for name in self.sample_tables:
            out_ids.update(tables[name].column("prompt_id").to_pylist())
        stats = {
            "shard_id": result["shard_id"],
            "shard_index": result["shard_index"],
            "prompts": result["prompts"],
            "prompts_out": len(out_ids),  # prompts with output rows
            "rows": {name: tables[name].num_rows for name in self.tables},
            "quarantined": dict(Counter(tables["quarantine"].column("reason").to_pylist())),
            "outcomes": result["outcomes"],
            "candidates": result.get("candidates", {}),  # per-candidate counts, e.g. judge_no_verdict
            "errors": result.get("errors", {}),
            "seconds": result["seconds"],
            # per stage: seconds in process() and samples (tokens for generate); a resumed build's totals
            "work": result.get("work", {}),
        }
        for name in self.tables:
            if name != "quarantine" or tables[name].num_rows:
                self.ds.write_part(name, result["shard_id"], tables[name], stats if name == self.tables[-1] else None)
        return stats

    def in_replica(self, result: dict) -> dict:
        """In the last stage's replica: write the shard's parts there and hand back only the stats
        (`{"written": stats}`), so that the rows never travel to the driver. When this node cannot see
        the output (a local folder on another node's disk) or the store refuses it (no credentials
        here), the result goes back whole, with the reason under "unwritten", and the driver writes it."""
        if self.ds.local and not self.ds.fs.exists(self.ds._path(CONFIG)):
            return dict(result, unwritten=f"{self.ds.uri} is not on this node's disk")
        try:
            return {"written": self(result)}
        except Exception as exc:  # a stop (KeyboardInterrupt, SystemExit) still goes up
            log.warning("could not write shard %s here (%s); the driver writes it", result["shard_id"], first_line(exc))
            return dict(result, unwritten=first_line(exc))


def write_parquet(data: pa.Table, f) -> None:
    """A Parquet part. A table without rows gets a file with no row group at all: a row group of 0
    rows makes `datasets` (pyarrow's batch reader) refuse the whole folder ("BatchSize must be greater
    than 0")."""
    with pq.ParquetWriter(f, data.schema, compression="zstd") as writer:
        if data.num_rows:
            writer.write_table(data)


class DatasetDir:
    def __init__(self, output: str, dataset: str, timeout_s: float = 30, retries: int = 4, backoff_s: float = 1.0,
                 credentials: dict | None = None):
        self._args = (output, dataset, timeout_s, retries, backoff_s)
        self.credentials = credentials
        self.uri = output.rstrip("/") + "/" + dataset
        self.fs, self.root = fsspec.core.url_to_fs(self.uri, **storage_options(self.uri, timeout_s, credentials))
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        self.retries, self.backoff_s = retries, backoff_s

    def for_replicas(self) -> "DatasetDir":
        """This folder as Ray replicas on any node should open it. On an object store it carries the
        endpoint, region and static keys this process resolved (from the environment, a profile file or
        a Prefect block), since replicas have neither the driver's environment nor its files; keys that
        refresh themselves (an IAM role, SSO) are left to each node's own credential chain."""
        if self.local:
            return self
        from fsspec.asyn import sync

        client = self.fs.connect()
        creds = dict(self.credentials or {})
        creds.setdefault("endpoint_url", client.meta.endpoint_url)
        creds.setdefault("region_name", client.meta.region_name)
        if not creds.get("aws_access_key_id"):
            found = sync(self.fs.loop, self.fs.session.get_credentials)
            if found is not None and found.method not in REFRESHING:
                frozen = sync(self.fs.loop, found.get_frozen_credentials)
                creds |= {"aws_access_key_id": frozen.access_key, "aws_secret_access_key": frozen.secret_key,
                          "aws_session_token": frozen.token}
        return DatasetDir(*self._args, credentials=creds)

    def _retry(self, what: str, op):
        """Run a store operation, retrying faults with exponential backoff; StorageError at the end."""
        for attempt in range(self.retries + 1):
            try:
                return op()
            except (FileExistsError, FileNotFoundError, UserError):
                raise  # answers, not faults
            except Exception as exc:  # endpoint down, connection reset, throttling...
                if attempt == self.retries:
                    first = first_line(exc)
                    raise StorageError(
                        f"storage {self.uri} failed to {what} after {self.retries + 1} attempts: {first}"
                    ) from exc
                delay = self.backoff_s * 2**attempt
                log.warning("storage fault (%s: %s); retrying %s in %.1fs", type(exc).__name__, what, what, delay)
                time.sleep(delay)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _inside(self, rel: str) -> str:
        """A path a manifest names, refused unless it stays inside the dataset folder."""
        norm = posixpath.normpath(rel)
        if rel.startswith("/") or norm == ".." or norm.startswith("../") or "://" in rel:
            raise UserError(f"{self.uri}: the manifest names a file outside the dataset: {rel!r}")
        return self._path(norm)

    def _put(self, final: str, write) -> None:
        """Write atomically: temp file + rename on local disk, one PUT on object stores."""
        self._retry(f"write {posixpath.relpath(final, self.root)}", lambda: self._put_once(final, write))

    def _put_once(self, final: str, write) -> None:
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
            self._put_once(probe, lambda f: f.write(b""))
            self.fs.rm(probe)
        except Exception as exc:  # any storage failure is the user's output setting
            first = first_line(exc)
            raise UserError(f"cannot write to output {self.uri}: {first}") from None

    def _read_json(self, rel: str) -> dict | None:
        path = self._path(rel)

        def read():
            if not self.fs.exists(path):
                return None
            with self.fs.open(path, "rb") as f:
                return json.load(f)

        return self._retry(f"read {rel}", read)

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
        """Take the folder for this config. The last committed manifest stays where it is: readers keep
        the previous version until this run commits its own."""
        self.check_owner(fingerprint)
        self.write_bytes(CONFIG, json.dumps({"fingerprint": fingerprint, "config": config}, indent=2).encode())

    # parts -----------------------------------------------------------------------------------
    def part_path(self, table: str, part: str, staged: bool = False) -> str:
        return self._path(*([STAGING] if staged else []), table, f"part-{part}.parquet")

    def write_part(self, table: str, part: str, data: pa.Table, stats: dict | None = None) -> None:
        """Stage a part; publish() moves it into its table when the run finishes."""
        data = data.cast(TABLES[table])
        if stats is not None:
            data = data.replace_schema_metadata({STATS_KEY: json.dumps(stats).encode()})
        self._put(self.part_path(table, part, staged=True), lambda f: write_parquet(data, f))

    def write_keyed(self, table: str, key: str, data: pa.Table) -> str:
        """Stage a part named by its key and a hash of its content (`key@hash`): a part whose content
        can change under the same key never overwrites another version's. Returns the part name."""
        sink = pa.BufferOutputStream()
        write_parquet(data.cast(TABLES[table]), sink)  # serialised once: the hash is of the part's own bytes
        body = sink.getvalue().to_pybytes()
        name = f"{key}@{hashlib.sha256(body).hexdigest()[:12]}"
        self._put(self.part_path(table, name, staged=True), lambda f: f.write(body))
        return name

    def written(self, table: str) -> set[str]:
        """Names of the table's parts, staged (this run) or published (an earlier one). For the table a
        shard writes last, these are the shards done."""
        return set(self.parts(table, staged=True)) | set(self.parts(table))

    def parts(self, table: str, staged: bool = False) -> dict[str, str]:
        """part name -> path, for finished parts only."""
        pattern = self.part_path(table, "*", staged)
        paths = self._retry(f"list {table}", lambda: sorted(self.fs.glob(pattern)))
        return {posixpath.basename(p)[len("part-") : -len(".parquet")]: p for p in paths}

    def read_part(self, table: str, part: str) -> pa.Table:
        """One part, staged (this run) or published (an earlier run)."""
        staged = self.part_path(table, part, staged=True)
        path = staged if self._retry("look up a part", lambda: self.fs.exists(staged)) else self.part_path(table, part)
        return self.read_file(path)

    def read_file(self, path: str) -> pa.Table:
        def read():
            with self.fs.open(path, "rb") as f:
                # use_threads=False: pyarrow 26 reading from Python file objects with threads can abort the
                # process at exit ("terminate called without an active exception"); parts are small.
                return pq.read_table(f, use_threads=False).replace_schema_metadata(None)

        return self._retry(f"read {posixpath.relpath(path, self.root)}", read)

    def prune_staged(self, keep: dict[str, set[str]]) -> int:
        """Remove staged parts of the tables in `keep` whose names are not kept (left over from an
        earlier plan of the input), and leftovers of interrupted writes. Published parts are untouched:
        the committed version may list them."""
        removed = 0
        for table, names in keep.items():
            for part, path in self.parts(table, staged=True).items():
                if part not in names:
                    self._retry(f"remove {part}", lambda: self.fs.rm(path))
                    removed += 1
        for path in self._retry("list", lambda: self.fs.glob(self.part_path("*", "*", True) + ".tmp-*")):
            self.fs.rm(path)
        return removed

    def unlisted(self, manifest: dict) -> list[str]:
        """Published parts of any table that the manifest does not list (stale versions, leftovers)."""
        listed = {self._inside(f) for entry in manifest["tables"].values() for f in entry["files"]}
        paths = [p for table in TABLES for p in self.parts(table).values()]
        paths += self._retry("list", lambda: self.fs.glob(self.part_path("*", "*") + ".tmp-*"))
        return [p for p in paths if p not in listed]

    def remove(self, paths: list[str]) -> None:
        for path in paths:
            self._retry(f"remove {posixpath.relpath(path, self.root)}", lambda: self.fs.rm(path))

    def publish(self, tables: list[str]) -> int:
        """Move every staged part into its table (overwriting the same shard's older part). On object
        stores the copies and deletes of a table go out as concurrent batches."""
        moved = 0
        for table in tables:
            staged = self.parts(table, staged=True)
            if not staged:
                continue
            sources = list(staged.values())
            targets = [self.part_path(table, part) for part in staged]
            if self.local:  # a rename each: atomic, no bytes copied
                self.fs.makedirs(posixpath.dirname(targets[0]), exist_ok=True)
                for src, dst in zip(sources, targets):
                    os.replace(src, dst)
            else:
                self._retry(f"publish {table}", lambda: self.fs.copy(sources, targets))
                self._retry(f"publish {table}", lambda: self.fs.rm(sources))
            moved += len(sources)
        return moved

    def drop_staging(self) -> None:
        """Remove what is left of the staging prefix (empty folders on local disk)."""
        staging = self._path(STAGING)
        if self._retry("look up staging", lambda: self.fs.exists(staging)):
            self._retry("remove staging", lambda: self.fs.rm(staging, recursive=True))

    def footer(self, path: str) -> pq.FileMetaData:
        def read():
            with self.fs.open(path, "rb") as f:
                return pq.ParquetFile(f).metadata

        return self._retry("read a footer", read)

    def shard_stats(self, marker: str, names: set[str], known: dict[str, dict] | None = None) -> list[dict]:
        """The stats of the shards named (this version's): those in `known` (what this run's writers
        returned), the others from the footers of their marker parts (shards an earlier run built)."""
        known = known or {}
        out = []
        for name, path in self.parts(marker).items():
            if name not in names:
                continue
            if name in known:
                out.append(known[name])
                continue
            meta = self.footer(path).metadata or {}
            out.append(json.loads(meta.get(STATS_KEY, b"{}")))
        return out

    def row_counts(self, tables: list[str] | None = None, keep: dict[str, set[str]] | None = None,
                   known: dict[tuple[str, str], int] | None = None) -> dict[str, dict]:
        """Rows and the exact part files of each published table (what the manifest lists for readers);
        with `keep`, only the parts named there (this version's). Rows of the parts in `known` ((table,
        part) -> rows, as their writer counted them) are not read again from their footers."""
        known = known or {}
        counts = {}
        for table in tables if tables is not None else list(TABLES):
            parts = [(n, p) for n, p in self.parts(table).items() if keep is None or n in keep.get(table, ())]
            paths = [p for _, p in parts]
            rows = [known[(table, n)] if (table, n) in known else self.footer(p).num_rows for n, p in parts]
            counts[table] = {"rows": sum(rows), "parts": len(paths),
                             "files": [f"{table}/{posixpath.basename(p)}" for p in paths]}
        return counts

    def listed_files(self, table: str, manifest: dict | None = None) -> list[str]:
        """The part files of a table that the manifest lists (what is published when there is none)."""
        manifest = manifest if manifest is not None else self.read_manifest()
        if manifest is None:
            return list(self.parts(table).values())
        return [self._inside(f) for f in manifest["tables"].get(table, {}).get("files", [])]

    def read_parts(self, table: str, names: set[str]) -> pa.Table:
        """The published parts of a table with these names (one version's, whatever the manifest says)."""
        paths = [p for name, p in sorted(self.parts(table).items()) if name in names]
        return pa.concat_tables([self.read_file(p) for p in paths]) if paths else TABLES[table].empty_table()

    def read_table(self, table: str) -> pa.Table:
        """The table's parts: those the manifest lists when there is one, else what is published."""
        paths = self.listed_files(table)
        if not paths:
            return TABLES[table].empty_table()
        return pa.concat_tables([self.read_file(p) for p in paths])

    # manifest --------------------------------------------------------------------------------
    def commit_manifest(self, manifest: dict, keep_versions: int = 1) -> dict:
        """Commit a new version: `_versions/manifest-<n>.json` by exclusive create (two runs finishing
        into one folder cannot both take version n), then manifest.json replaced in one atomic step
        (a rename on local disk, one PUT on object stores). Keeps the last `keep_versions` older
        manifests for `dafactory inspect --version`. Returns the manifest with its version."""
        previous = self.read_manifest()
        manifest = manifest | {"version": (previous or {}).get("version", 0) + 1,
                               "previous_version": (previous or {}).get("version")}
        data = json.dumps(manifest, indent=2, default=str).encode()
        versioned = self._path(VERSIONS, f"manifest-{manifest['version']:06d}.json")
        self._retry("write the manifest version", lambda: self._create(versioned, data))
        self._retry("write the manifest", lambda: self._replace(self._path(MANIFEST), data))
        older = sorted(self._retry("list versions", lambda: self.fs.glob(self._path(VERSIONS, "manifest-*.json"))))
        self.remove(older[: max(0, len(older) - keep_versions - 1)])
        return manifest

    def versions(self) -> list[int]:
        paths = self._retry("list versions", lambda: self.fs.glob(self._path(VERSIONS, "manifest-*.json")))
        return sorted(int(posixpath.basename(p)[len("manifest-") : -len(".json")]) for p in paths)

    def read_version(self, version: int) -> dict | None:
        return self._read_json(posixpath.join(VERSIONS, f"manifest-{version:06d}.json"))

    def _replace(self, final: str, data: bytes) -> None:
        if not self.local:
            with self.fs.open(final, "wb") as f:  # one PUT: readers see the old object or the new one
                f.write(data)
            return
        tmp = final + f".tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, final)

    def _create(self, final: str, data: bytes) -> None:
        """Exclusive create. A retry that finds its own bytes already there (the first try's PUT landed
        but its answer was lost) counts as done; anything else there is another run's."""
        try:
            self._create_once(final, data)
        except FileExistsError:
            with self.fs.open(final, "rb") as f:
                if f.read() == data:
                    return
            raise UserError(f"{self.uri}: another run committed {posixpath.basename(final)} first") from None

    def _create_once(self, final: str, data: bytes) -> None:
        if not self.local:
            with self.fs.open(final, "xb") as f:  # a conditional PUT (If-None-Match) on S3
                f.write(data)
            return
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        tmp = final + f".tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, final)  # atomic, and fails if the manifest exists
        finally:
            self.fs.rm(tmp)

    def read_manifest(self) -> dict | None:
        return self._read_json(MANIFEST)

    def read_rebuild(self) -> dict | None:
        """What a failed or stopped rebuild got to, while the last version stands (None if none)."""
        return self._read_json(posixpath.join(STAGING, REBUILD))
