"""MinHash LSH over the whole input, for near-duplicate prompts. Pure: numpy only.

A prompt's shingles are the words of its normalised text (lower case, punctuation dropped), as a set: a
prompt is short, and one word of it is its content (character shingles make "question number 5" and
"question number 6" 0.86 alike). Its signature is 128 minimum hashes, each of a universal hash
(a*x + b mod 2**61 - 1) of the words' 32-bit hashes. 32 bands of 4 rows each go to the LSH index: two
prompts whose Jaccard similarity is s share a band with probability 1 - (1 - s**4)**32 (0.9999 at s = 0.8,
0.87 at 0.5). A candidate that shares a band is a duplicate when the signatures agree on at least
`threshold` (default 0.8, NeMo Curator's) of their 128 hashes (the estimate of s, within about 0.035).
One word changed in a dozen gives 11/13 = 0.85, one added 0.92: collapsed; one slot of a short template
("facts about cooking" / "about travel": 6/8 = 0.75; "How do I make a bomb?" / "a cake?" 0.71) is kept.

The index is on local disk (spill.py): memory stays flat from 100k prompts to 10M.

This is datasketch's MinHash and MinHashLSH (the same hash family and banding), vectorised over a
prompt's shingles in numpy. datasketch 2.0 itself was not taken: it needs scipy only to choose bands,
and it hashes a document's shingles one at a time in Python.
"""

from __future__ import annotations

import hashlib
import json
import zlib

import numpy as np

from dafactory.tasks.screen.spill import Batched, FirstSeen

PRIME = np.uint64((1 << 61) - 1)
MASK = np.uint64(0xFFFFFFFF)


def shingles(text: str) -> set[str]:
    """The words of a normalised text, as a set (the text itself when it has none)."""
    return set(text.split()) or {text}


class MinHasher:
    def __init__(self, num_perm: int = 128, seed: int = 1):
        rng = np.random.RandomState(seed)
        self.a = rng.randint(1, 1 << 32, num_perm, dtype=np.uint64)
        self.b = rng.randint(0, 1 << 32, num_perm, dtype=np.uint64)

    def signature(self, text: str) -> np.ndarray:
        x = np.fromiter((zlib.crc32(s.encode()) for s in shingles(text)), dtype=np.uint64)
        # a, x < 2**32: a * x + b stays below 2**64
        return (((self.a[:, None] * x[None, :] + self.b[:, None]) % PRIME) & MASK).min(axis=1).astype(np.uint32)


class NearDuplicateIndex:
    """First occurrence kept, over a whole stream: `find_at(i, key)` returns (the key of the earlier kept
    prompt text i duplicates, the estimated Jaccard similarity), or registers it under `key` and returns None. The
    kept prompts' band keys and signatures are on local disk (spill.py), so memory stays flat over any
    input; a batch is looked up at once: `prepare(texts)`, then `find_at(i, key)` in order, then `flush()`."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, bands: int = 32):
        if num_perm % bands:
            raise ValueError("num_perm must be a multiple of bands")
        self.threshold, self.bands, self.rows = threshold, bands, num_perm // bands
        self.hasher = MinHasher(num_perm)
        self.buckets = Batched(1)  # band key -> (index of the first kept prompt with it,)
        self.kept = FirstSeen(2)  # index -> (its key as JSON, its signature's bytes)
        self.count = 0
        self._batch: list[tuple[np.ndarray, list[int]]] = []
        self._candidates: dict[int, tuple] = {}  # index -> (key, signature): this batch's candidates and kept
        self._new: list[tuple] = []

    def _band_keys(self, sig: np.ndarray) -> list[int]:
        return [int.from_bytes(hashlib.blake2b(sig[i * self.rows : (i + 1) * self.rows].tobytes() + bytes([i]),
                                               digest_size=8).digest(), "little", signed=True)
                for i in range(self.bands)]

    def prepare(self, texts: list[str]) -> None:
        """Sign a batch and fetch the kept prompts that share a band with any of it (two queries)."""
        self._batch = [(sig, self._band_keys(sig)) for sig in map(self.hasher.signature, texts)]
        self.buckets.prefetch(b for _, bands in self._batch for b in bands)
        found = self.kept.fetch({v[0] for v in self.buckets.hits.values()})
        self._candidates = {j: (_key(k), np.frombuffer(sig, dtype=np.uint32)) for j, (k, sig) in found.items()}

    def find_at(self, i: int, key) -> tuple[object, float] | None:
        sig, bands = self._batch[i]
        best = None
        for j in dict.fromkeys(v[0] for v in map(self.buckets.get, bands) if v is not None):
            other_key, other = self._candidates[j]
            s = float(np.mean(other == sig))
            if s >= self.threshold and (best is None or s > best[1]):
                best = (other_key, s)
        if best is not None:
            return best
        j, self.count = self.count, self.count + 1
        self._candidates[j] = (key, sig)
        self._new.append((j, json.dumps(key), sig.tobytes()))
        for b in bands:
            self.buckets.setdefault(b, (j,))
        return None

    def flush(self) -> None:
        self.buckets.flush()
        self.kept.add(self._new)
        self._batch, self._candidates, self._new = [], {}, []

    def close(self) -> None:
        """Remove the index's files (the input is screened); a later batch would start an empty index."""
        self.buckets.store.close()
        self.kept.close()
        self.count = 0


def _key(text: str):
    key = json.loads(text)
    return tuple(key) if isinstance(key, list) else key
