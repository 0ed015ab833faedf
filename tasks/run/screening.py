"""The screen of a training recipe's input, built from its config (tasks/screen/rules.py). The encoder
and the evaluation sets' embeddings load at the screen's first batch, inside the `prepare` task, so that
a cached plan loads no model."""

from __future__ import annotations

from typing import Callable

from dafactory.tasks.config import ScreenedConfig
from dafactory.tasks.io.prompts import PromptRow, PromptSet
from dafactory.tasks.screen import embed
from dafactory.tasks.screen.minhash import NearDuplicateIndex
from dafactory.tasks.screen.ngram import Decontaminator, eval_prompts
from dafactory.tasks.screen.rules import EvalVectors, Screen


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
        self.loaded = False

    def _load(self) -> None:
        if self.uses_encoder:
            encoder = embed.encoder(self.config.decontamination.encoder)
            self.screen.encode = encoder.encode
            if self.embedding:
                self.screen.eval_vectors = [
                    EvalVectors(name, eval_prompts(name), encoder.cached(eval_prompts(name)))
                    for name in self.config.decontamination.eval_sets
                ]
        self.loaded = True

    def __call__(self, prompts: PromptSet, late: dict) -> PromptSet:
        if not self.loaded:
            self._load()
        return self.screen(prompts, late)

    def summary(self) -> dict:
        return self.screen.summary()
