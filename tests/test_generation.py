"""Generation bookkeeping, with the fake backend and with a tiny real transformers model."""

import pytest

from tasks.backends.fake import FakeBackend
from tasks.config import ModelConfig, SamplingConfig
from tasks.generation import ChatPrompt, batch_seed, generate_shard
from tasks.prompts import PromptRow, Shard, prompt_id


def shard(texts, sid="s1"):
    return Shard(sid, 0, tuple(PromptRow(prompt_id(t), t, None, i) for i, t in enumerate(texts)))


def test_rows_cover_every_prompt_and_sample_once():
    b = FakeBackend(ModelConfig(backend="fake", model="m"))
    rows, quarantine = generate_shard(b, shard(["a b", "c d e"]), n=3, sampling=SamplingConfig(), batch_size=4,
                                      conversation=ChatPrompt())
    assert [(r["prompt"], r["sample_idx"]) for r in rows] == [
        ("a b", 0), ("a b", 1), ("a b", 2), ("c d e", 0), ("c d e", 1), ("c d e", 2)
    ]
    # two generate() calls (batch 4 then 2), each with its own recorded seed
    assert [r["seed"] for r in rows] == [batch_seed(0, "s1", 0)] * 4 + [batch_seed(0, "s1", 1)] * 2
    assert quarantine == [] and {r["model"] for r in rows} == {"fake:m"}


def test_prompts_too_long_for_the_context_are_quarantined():
    b = FakeBackend(ModelConfig(backend="fake", params={"context_length": 10}))
    s = shard(["one two three", "w " * 8])
    rows, quarantine = generate_shard(b, s, n=2, sampling=SamplingConfig(max_new_tokens=4), batch_size=8,
                                      conversation=ChatPrompt())
    assert {r["prompt"] for r in rows} == {"one two three"}
    assert [(q["reason"], q["detail"]) for q in quarantine] == [
        ("too_long", "8 prompt tokens + max_new_tokens 4 > context 10")
    ]


@pytest.fixture(scope="module")
def tiny_lm(tiny_models):
    from tasks.backends.hf import HFBackend

    b = HFBackend(ModelConfig(model=tiny_models["lm"]))
    b.load()
    return b


def test_hf_backend_counts_and_finish_reasons(tiny_lm, tiny_models):
    tok = tiny_models["tokenizer"]
    convs = [[{"role": "user", "content": "hello"}], [{"role": "user", "content": "how do i make a cake please"}]]
    gens = tiny_lm.generate(convs * 2, SamplingConfig(max_new_tokens=6, temperature=1.0), seed=3)
    for conv, g in zip(convs * 2, gens):
        text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        assert g.prompt_tokens == len(tok(text, add_special_tokens=False)["input_ids"])  # left padding excluded
        assert g.response_tokens <= 6
        assert (g.finish_reason == "length") == (g.response_tokens == 6)
    assert tiny_lm.count_prompt_tokens(convs) == [g.prompt_tokens for g in gens[:2]]
    assert tiny_lm.context_length() == 64


def test_hf_backend_same_seed_same_text(tiny_lm):
    convs = [[{"role": "user", "content": "explain the sky"}]] * 3
    s = SamplingConfig(max_new_tokens=8, temperature=1.0)
    a = [g.text for g in tiny_lm.generate(convs, s, seed=11)]
    assert a == [g.text for g in tiny_lm.generate(convs, s, seed=11)]
    assert a != [g.text for g in tiny_lm.generate(convs, s, seed=12)]


def test_hf_greedy_is_identical_across_samples(tiny_lm):
    convs = [[{"role": "user", "content": "hello world"}]] * 2 + [[{"role": "user", "content": "the sky is blue"}]]
    gens = tiny_lm.generate(convs, SamplingConfig(max_new_tokens=5, temperature=0), seed=0)
    assert gens[0] == gens[1]
    # left padding does not change a greedy continuation: same text alone as in the batch
    (alone,) = tiny_lm.generate(convs[:1], SamplingConfig(max_new_tokens=5, temperature=0), seed=0)
    assert alone.text == gens[0].text
