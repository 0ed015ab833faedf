"""What the screen remembers about the whole input, on local disk: the first prompt seen under each key
(a normalised text's hash, a MinHash band), so that the driver's memory stays flat however many prompts
there are. Pure: the standard library's SQLite, one file in a temporary folder, read a batch at a time.

SQLite, not a dict: a dict of 32 band keys per kept prompt holds about 4 KB per prompt (4 GB at 1M); the
table holds 8 bytes per key plus its B-tree on disk, and the process keeps only SQLite's page cache
(`CACHE_MB`). It is the kind of store NeMo Curator spills its LSH buckets to (Parquet there, sorted on a
GPU); a B-tree keeps this screen's rule exact: each prompt against the prompts kept before it, in input
order.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
from collections.abc import Iterable

import numpy as np

CACHE_MB = 8
CHUNK = 10_000  # keys per IN (...) query (SQLite allows 32,766 variables)


def signed(key: int) -> int:
    """A 64-bit unsigned key as SQLite's signed INTEGER."""
    return key - (1 << 64) if key >= 1 << 63 else key


class FirstSeen:
    """key (a signed 64-bit int) -> the first value added under it (a tuple of `width` SQLite values)."""

    def __init__(self, width: int):
        self.width = width
        self._dir: tempfile.TemporaryDirectory | None = None
        self._db: sqlite3.Connection | None = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:  # made at first use, so that an unused screen makes no file
            self._dir = tempfile.TemporaryDirectory(prefix="dafactory-screen-")
            self._db = sqlite3.connect(os.path.join(self._dir.name, "first.sqlite"), check_same_thread=False)
            for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size=-{CACHE_MB * 1024}"):
                self._db.execute(f"PRAGMA {pragma}")
            cols = ", ".join(f"v{i}" for i in range(self.width))
            self._db.execute(f"CREATE TABLE first (k INTEGER PRIMARY KEY, {cols})")
        return self._db

    def fetch(self, keys: Iterable[int]) -> dict[int, tuple]:
        """The value first added under each of these keys that has one."""
        keys = list(set(keys))
        out: dict[int, tuple] = {}
        for lo in range(0, len(keys), CHUNK):
            chunk = keys[lo : lo + CHUNK]
            # padded (with its first key) to a power of two: a handful of distinct statements, not one per
            # batch size (the sqlite3 module caches 128 prepared statements, each as big as its list)
            chunk += chunk[:1] * (min(CHUNK, 1 << (len(chunk) - 1).bit_length()) - len(chunk))
            marks = ",".join("?" * len(chunk))
            for k, *values in self.db.execute(f"SELECT * FROM first WHERE k IN ({marks})", chunk):
                out[k] = tuple(values)
        return out

    def add(self, items: Iterable[tuple]) -> None:
        """(key, *values) rows; a key already there keeps its first value."""
        marks = ",".join("?" * (self.width + 1))
        self.db.executemany(f"INSERT OR IGNORE INTO first VALUES ({marks})", items)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._dir.cleanup()
            self._db = self._dir = None

    def __getstate__(self):  # a screen handed to another process starts empty there (never done mid-plan)
        return {"width": self.width, "_dir": None, "_db": None}


class Batched:
    """A FirstSeen read a batch at a time: `prefetch` the batch's keys (one query), then `get` and
    `setdefault` in input order (the batch's own first values included), then `flush` them to disk."""

    def __init__(self, width: int):
        self.store = FirstSeen(width)
        self.hits: dict[int, tuple] = {}
        self.new: dict[int, tuple] = {}

    def prefetch(self, keys: Iterable[int]) -> None:
        self.hits, self.new = self.store.fetch(keys), {}

    def get(self, key: int) -> tuple | None:
        found = self.hits.get(key)
        return found if found is not None else self.new.get(key)

    def setdefault(self, key: int, value: tuple) -> None:
        if key not in self.hits:
            self.new.setdefault(key, value)

    def flush(self) -> None:
        self.store.add((k, *v) for k, v in self.new.items())
        self.hits, self.new = {}, {}


class Vectors:
    """Unit vectors appended to a file on local disk, each with a value; `best(queries)` finds, for each query,
    the stored vector of highest cosine, reading the file ROWS at a time (memory: one block, whatever the
    count). Exact: every stored vector is compared (semantic dedup is O(n^2), as STAR-1's greedy pass is)."""

    ROWS = 16_384

    def __init__(self):
        self._dir: tempfile.TemporaryDirectory | None = None
        self.dim, self.count = 0, 0
        self.values = FirstSeen(1)  # index -> its value as JSON

    @property
    def path(self) -> str:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="dafactory-screen-")
        return os.path.join(self._dir.name, "vectors.f32")

    def add(self, vectors: np.ndarray, values: list) -> None:
        if not len(values):
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.dim = vectors.shape[1]
        with open(self.path, "ab") as f:
            f.write(vectors.tobytes())
        self.values.add((self.count + i, json.dumps(v)) for i, v in enumerate(values))
        self.count += len(values)

    def best(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index, cosine) of each query's nearest stored vector; index -1 and cosine -inf when none is stored."""
        index = np.full(len(queries), -1, dtype=np.int64)
        cos = np.full(len(queries), -np.inf, dtype=np.float32)
        if not self.count or not len(queries):
            return index, cos
        q = np.asarray(queries, dtype=np.float32)
        with open(self.path, "rb") as f:
            for lo in range(0, self.count, self.ROWS):
                n = min(self.ROWS, self.count - lo)
                block = np.fromfile(f, dtype=np.float32, count=n * self.dim).reshape(n, self.dim)
                sims = q @ block.T
                j = sims.argmax(axis=1)
                c = sims[np.arange(len(q)), j]
                better = c > cos
                index[better], cos[better] = j[better] + lo, c[better]
        return index, cos

    def value(self, indices) -> dict[int, object]:
        return {k: json.loads(v[0]) for k, v in self.values.fetch(int(i) for i in indices).items()}

    def close(self) -> None:
        self.values.close()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
        self.dim = self.count = 0

    def __getstate__(self):  # as FirstSeen: a copy in another process starts empty
        return {"_dir": None, "dim": 0, "count": 0, "values": FirstSeen(1)}
