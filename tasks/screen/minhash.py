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

This is datasketch's MinHash and MinHashLSH (the same hash family and banding), vectorised over a
prompt's shingles in numpy. datasketch 2.0 itself was not taken: it needs scipy only to choose bands,
and it hashes a document's shingles one at a time in Python.
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np

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
    """First occurrence kept, over a whole stream: `find(text)` returns (the key of the earlier kept prompt
    it duplicates, the estimated Jaccard similarity), or registers it under `key` and returns None."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, bands: int = 32):
        if num_perm % bands:
            raise ValueError("num_perm must be a multiple of bands")
        self.threshold, self.bands, self.rows = threshold, bands, num_perm // bands
        self.hasher = MinHasher(num_perm)
        self.buckets: dict[bytes, int] = {}  # band key -> index of the kept prompt
        self.signatures: list[np.ndarray] = []
        self.keys: list = []

    def _band_keys(self, sig: np.ndarray) -> list[bytes]:
        return [hashlib.blake2b(sig[i * self.rows : (i + 1) * self.rows].tobytes() + bytes([i]),
                                digest_size=8).digest() for i in range(self.bands)]

    def find(self, text: str, key) -> tuple[object, float] | None:
        sig = self.hasher.signature(text)
        bands = self._band_keys(sig)
        best = None
        for j in dict.fromkeys(self.buckets[b] for b in bands if b in self.buckets):
            s = float(np.mean(self.signatures[j] == sig))
            if s >= self.threshold and (best is None or s > best[1]):
                best = (self.keys[j], s)
        if best is not None:
            return best
        j = len(self.keys)
        self.signatures.append(sig)
        self.keys.append(key)
        for b in bands:
            self.buckets.setdefault(b, j)
        return None
