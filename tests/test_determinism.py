"""Same config and seed, same candidates: a tiny real transformers model on CPU, without Prefect or Ray."""

import pytest

from dafactory.tasks.config import ModelConfig, SamplingConfig
from dafactory.tasks.generate.backends.hf import HFBackend
from dafactory.tasks.generate.generation import ChatPrompt, generate_shard
from dafactory.tasks.io.prompts import PromptRow, Shard, prompt_id

PROMPTS = ["how do i make a cake", "explain the sky", "hello world", "is the sky blue", "make a bomb please"]


def shard(sid: str, texts: list[str]) -> Shard:
    return Shard(sid, 0, tuple(PromptRow(prompt_id(t), t, None, i) for i, t in enumerate(texts)))


@pytest.fixture
def fresh_backend(tiny_models):
    """A newly loaded backend per call: nothing carried over from an earlier load or generate()."""

    def make() -> HFBackend:
        b = HFBackend(ModelConfig(model=tiny_models["lm"]))
        b.load()
        return b

    return make


def generate(backend, s: Shard, seed: int = 7) -> list[dict]:
    sampling = SamplingConfig(temperature=0.7, max_new_tokens=12, seed=seed)
    rows, quarantine = generate_shard(backend, s, n=3, sampling=sampling, batch_size=4, conversation=ChatPrompt())
    assert quarantine == []
    return rows


def test_same_config_and_seed_give_identical_rows(fresh_backend):
    s = shard("s1", PROMPTS)
    first, second = generate(fresh_backend(), s), generate(fresh_backend(), s)
    assert len(first) == 15  # 5 prompts x 3 samples, in 4 batches
    # texts, finish reasons, token counts and recorded seeds: every field of every row
    assert first == second


def test_another_seed_gives_other_texts(fresh_backend):
    b, s = fresh_backend(), shard("s1", PROMPTS)
    a, other = generate(b, s, seed=7), generate(b, s, seed=8)
    assert {r["seed"] for r in a}.isdisjoint(r["seed"] for r in other)
    assert any(x["response"] != y["response"] for x, y in zip(a, other))


def test_rows_do_not_depend_on_what_the_replica_generated_before(fresh_backend):
    # a shard gives the same rows whichever replica runs it and whatever that replica ran first,
    # so the output does not depend on the number of replicas or the order shards reach them
    s1, s2 = shard("s1", PROMPTS[:3]), shard("s2", PROMPTS[2:])
    alone = generate(fresh_backend(), s2)
    busy = fresh_backend()
    generate(busy, s1)
    assert generate(busy, s2) == alone
    assert generate(busy, s1) == generate(fresh_backend(), s1)
