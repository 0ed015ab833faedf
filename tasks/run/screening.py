"""The screen of a training recipe's input, built from its config (tasks/screen/rules.py). The encoder
and the evaluation sets' embeddings load at the screen's first batch, inside the `prepare` task, so that
a cached plan loads no model.

Within a flow (Ray is up) the encoder runs in Ray replicas (`decontamination.num_replicas`, `num_gpus`,
`num_cpus`): each embeds a contiguous share of every batch, on a GPU when given one, so that a driver
without one never embeds a 10M-prompt input itself. They are killed when the plan is done, before the
generation stages ask for their resources. Without Ray (a script that calls the screen), one encoder
loads in the process.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Callable

import numpy as np
import ray

from dafactory.tasks.config import DecontaminationConfig, RayConfig, ScreenedConfig
from dafactory.tasks.io.prompts import PromptRow, PromptSet
from dafactory.tasks.screen import embed
from dafactory.tasks.screen.minhash import NearDuplicateIndex
from dafactory.tasks.screen.ngram import Decontaminator, eval_prompts
from dafactory.tasks.screen.rules import EvalVectors, Screen
from dafactory.tasks.run.control import gpu_slot
from dafactory.tasks.run.stages import (
    StageSpec,
    auto_cpus,
    gc_loading,
    kill_stages,
    start_stages,
    use_cpus,
    worker_info,
)


class EncoderReplica:
    """A Ray actor that loads the encoder once and embeds what it is given."""

    def __init__(self, name: str, num_cpus: float):
        t0 = time.perf_counter()
        with gc_loading():
            self.encoder = embed.Encoder(name)
        use_cpus(num_cpus)
        self.load_seconds = time.perf_counter() - t0

    def info(self) -> dict:
        return worker_info() | {"load_seconds": self.load_seconds, "device": self.encoder.device}

    def encode(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode(texts)


class ReplicaEncoder:
    """`encode` over the encoder's Ray replicas: a batch is cut into one contiguous share per replica and
    put back together in order."""

    def __init__(self, cfg: DecontaminationConfig, ray_cfg: RayConfig, slot_timeout_s: float):
        cpus = cfg.num_cpus if cfg.num_cpus is not None else auto_cpus([], cfg.num_replicas, ray_cfg)
        self.spec = StageSpec("encode", EncoderReplica, (cfg.encoder, cpus), cfg.num_replicas, cfg.num_gpus, cpus)
        self.slot = ExitStack()
        if cfg.num_gpus:  # replicas on GPUs hold the global GPU slot while they live, as the build's do
            self.slot.enter_context(gpu_slot(slot_timeout_s, {}))
        try:
            self.workers = start_stages([self.spec], local=not ray_cfg.cluster_address())
        except BaseException:
            self.close()
            raise
        _, revision = embed.resolve(cfg.encoder)
        self.key = (cfg.encoder, revision, str(embed.MAX_LENGTH))  # as a local Encoder's: one cache for both

    def encode(self, texts: list[str]) -> np.ndarray:
        actors = self.spec.actors[: max(1, min(len(self.spec.actors), len(texts)))]
        bounds = np.linspace(0, len(texts), len(actors) + 1).astype(int).tolist()
        shares = [a.encode.remote(texts[lo:hi]) for a, lo, hi in zip(actors, bounds[:-1], bounds[1:])]
        return np.concatenate(ray.get(shares))

    def close(self) -> None:
        try:
            kill_stages([self.spec])
        finally:
            self.slot.close()


class LazyScreen:
    """A Screen whose encoder and evaluation embeddings are made at its first batch."""

    def __init__(self, config: ScreenedConfig, check: Callable[[PromptRow], None] | None = None):
        decon, dedup = config.decontamination, config.dedup
        self.embedding = decon.enabled and decon.embedding and bool(decon.eval_sets)
        self.uses_encoder = self.embedding or dedup.semantic is not None
        if self.uses_encoder:
            embed.resolve(decon.encoder)  # a missing package: one line now, before any model loads
        self.config, self.screen = config, Screen(
            check=check,
            ngram=Decontaminator(decon.eval_sets, decon.ngram) if decon.enabled else None,
            threshold=decon.threshold,
            normalised=dedup.normalised,
            minhash=NearDuplicateIndex(dedup.minhash) if dedup.minhash is not None else None,
            semantic=dedup.semantic,
            encoder_name=decon.encoder,
        )
        self.loaded, self.encoder = False, None

    def _load(self) -> None:
        if self.uses_encoder:
            decon = self.config.decontamination
            if ray.is_initialized():
                self.encoder = ReplicaEncoder(decon, self.config.ray, self.config.gpu_slot_timeout_s)
                encode, key = self.encoder.encode, self.encoder.key
            else:
                local = embed.encoder(decon.encoder)
                encode, key = local.encode, local.key
            self.screen.encode = encode
            if self.embedding:
                self.screen.eval_vectors = [
                    EvalVectors(name, eval_prompts(name), embed.cached(encode, key, eval_prompts(name)))
                    for name in decon.eval_sets
                ]
        self.loaded = True

    def close(self) -> None:
        """Free the encoder's replicas and the screen's files (the plan is done); a later call (a plan made
        again) loads them anew and screens from scratch."""
        self.screen.close()
        if self.encoder is not None:
            self.encoder.close()
            self.encoder, self.loaded = None, False

    def __call__(self, prompts: PromptSet, late: dict) -> PromptSet:
        if not self.loaded:
            self._load()
        return self.screen(prompts, late)

    def summary(self) -> dict:
        return self.screen.summary()
