"""The run-level rule for generation errors (`max_error_rate`). Pure: no Prefect, Ray or torch.

A prompt whose generation raises (after its batch was split down to it alone) is quarantined with reason
`generation_error`. Whether the run may go on is judged over the run so far, not per shard: a shard of 64
prompts holds too few for its share to say anything (under a 3% random fault, about 13% of such shards
exceed 5%). The run fails once its errors show, with high confidence, a rate above `max_error_rate`: the
Wilson score interval's lower bound at z = 4 (one-sided, about 3 in 100,000 for one look) is above it.

- A systematic fault (every call raises) fails the run after its first shard (1 error of 1 prompt is
  enough at a 5% limit: the bound is 0.059); a fault on 20% of prompts within one shard of 64.
- A 3% random fault under a 5% limit does not fail a build, at any size, looked at after every shard
  (tests/test_error_rate.py draws 20,000 runs of 100 shards).
- `max_error_rate` 0 fails on the first error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

Z = 4.0


def wilson_lower(errors: int, n: int, z: float = Z) -> float:
    """The Wilson score interval's lower bound of a rate seen as errors of n (0 when n is 0)."""
    if n <= 0:
        return 0.0
    p = errors / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z2 / n))


class TooManyErrors(RuntimeError):
    """Generation errors show a rate above `max_error_rate`: a systematic fault (an API change, a CUDA
    device assert, a broken tokenizer), not bad rows. Raised by a shard (its own errors: the shard fails
    and is retried) and by the driver (the run's: the run fails before it commits a complete version; its
    shards stay written, and those with errors are built again by the next run). Carries the counts, so
    that a shard given up after its retries still counts in the run's rate (it pickles through Ray)."""

    one_line = True  # an outcome with its counts in the message; the traceback says nothing more

    def __init__(self, message: str, prompts: int = 0, errors: dict | None = None, first: str | None = None):
        super().__init__(message, prompts, errors or {}, first)
        self.message, self.prompts, self.errors, self.first = message, prompts, errors or {}, first

    def __str__(self) -> str:
        return self.message


@dataclass
class ErrorBudget:
    """Prompts and generation errors of the run so far (resumed shards included)."""

    max_rate: float
    prompts: int = 0
    errors: int = 0
    by_type: dict = field(default_factory=dict)
    first: str | None = None  # the first error's "Type: message"

    def add(self, prompts: int, errors: dict[str, int], first: str | None = None) -> None:
        """One shard's prompts, its generation errors by exception type and the first one's text."""
        self.prompts += prompts
        self.first = self.first or first
        for kind, n in errors.items():
            self.errors += n
            self.by_type[kind] = self.by_type.get(kind, 0) + n

    def add_stats(self, stats: dict) -> None:
        """One shard's stats as its marker holds them (`prompts`, `errors.generation_error`)."""
        self.add(stats.get("prompts", 0), stats.get("errors", {}).get("generation_error", {}),
                 stats.get("first_error"))

    def exceeded(self) -> bool:
        if self.max_rate <= 0:
            return self.errors > 0
        return wilson_lower(self.errors, self.prompts) > self.max_rate

    def error(self, scope: str = "so far") -> TooManyErrors:
        return TooManyErrors(self.message(scope), self.prompts, dict(self.by_type), self.first)

    def message(self, scope: str = "so far") -> str:
        types = ", ".join(f"{k} {v}" for k, v in sorted(self.by_type.items()))
        return (f"generation failed on {self.errors} of {self.prompts} prompts {scope} ({types}): the rate is above "
                f"max_error_rate {self.max_rate:g} with 99.99% confidence (Wilson lower bound "
                f"{wilson_lower(self.errors, self.prompts):.3f}); first: {self.first}")
