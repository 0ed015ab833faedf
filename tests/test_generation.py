"""Generation bookkeeping, with the fake backend and with a tiny real transformers model."""

import os
from collections import Counter

import pyarrow as pa
import pytest

from dafactory.tasks.config import ModelConfig, SamplingConfig
from dafactory.tasks.generate.backends.fake import FakeBackend, word_id
from dafactory.tasks.generate.generation import ChatPrompt, batch_seed, generate_shard, sub_batch_seed
from dafactory.tasks.io.prompts import PromptRow, Shard, prompt_id
from dafactory.tasks.io.schemas import GENERATED, to_table


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
    # the generator's token ids travel with each row: the fake backend's are its words' hashes
    assert all(r["response_token_ids"] == [word_id(w) for w in r["response"].split()] for r in rows)
    assert all(len(r["response_token_ids"]) == r["response_tokens"] for r in rows)
    table = to_table(rows, GENERATED)
    assert table.schema.field("response_token_ids").type == pa.list_(pa.int32())
    assert table.column("response_token_ids").to_pylist() == [r["response_token_ids"] for r in rows]


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
    from dafactory.tasks.generate.backends.hf import HFBackend

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
        # the ids it generated (EOS excluded) are the text's, as the tokenizer decodes them
        assert len(g.token_ids) == g.response_tokens and tok.eos_token_id not in g.token_ids
        assert tok.decode(list(g.token_ids), skip_special_tokens=True) == g.text
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


# --- generation faults: a call that raises is split in halves of its requests, down to one request ----

class RecordingBackend(FakeBackend):
    """The fake backend, keeping (samples per request, whether it raised) for each sample() call."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.calls = []

    def sample(self, requests, sampling):
        try:
            gens = super().sample(requests, sampling)
        except Exception:
            self.calls.append(([r.n for r in requests], "raised"))
            raise
        self.calls.append(([r.n for r in requests], "ok"))
        return gens


FIVE = ["p0 alpha", "p1 beta", "p2 gamma", "p3 BAD delta", "p4 epsilon"]


def run(backend, texts, n=3, batch_size=8, stats=None):
    return generate_shard(backend, shard(texts), n=n, sampling=SamplingConfig(), batch_size=batch_size,
                          conversation=ChatPrompt(), stats=stats)


def test_a_failing_prompt_is_quarantined_and_the_rest_of_its_batch_retried(caplog):
    stats = Counter()
    b = RecordingBackend(ModelConfig(backend="fake", params={"fail_on": "BAD"}))
    rows, quarantine = run(b, FIVE, stats=stats)
    # 15 sequences: batch 0 is p0, p1 and two samples of p2; batch 1 (7) is p2's last sample, p3 and p4: three
    # requests. Batch 1 splits [p2, p3, p4] -> [p2] + [p3, p4] -> [p3] + [p4]: only calls with p3 raise.
    assert b.calls == [
        ([3, 3, 2], "ok"), ([1, 3, 3], "raised"), ([1], "ok"), ([3, 3], "raised"), ([3], "raised"), ([3], "ok"),
    ]
    assert quarantine == [{
        "prompt_id": prompt_id("p3 BAD delta"), "source_row": 3, "prompt": "p3 BAD delta",
        "reason": "generation_error", "detail": "RuntimeError: injected failure on a prompt containing BAD",
    }]
    assert [(r["prompt"], r["sample_idx"]) for r in rows] == [(t, k) for t in FIVE if "BAD" not in t for k in range(3)]
    # each row records the seed of the call that produced it: the batch's, or its sequences' after a split
    sub = [sub_batch_seed(0, "s1", 1, 0, 1)] + [sub_batch_seed(0, "s1", 1, 4, 7)] * 3
    assert [r["seed"] for r in rows] == [batch_seed(0, "s1", 0)] * 8 + sub
    assert stats == {"splits": 2, "generation_error": 1}
    assert [r.getMessage() for r in caplog.records if r.name == "dafactory.tasks.generate.generation"] == [
        f"generate() of {size} sequences raised RuntimeError; retrying in halves" for size in (7, 6)
    ]
    # the batch that did not fail is exactly what a run without fail_on gives
    clean, _ = run(FakeBackend(ModelConfig(backend="fake")), FIVE)
    assert rows[:8] == clean[:8]


class FailsInLaterBatches(FakeBackend):
    """Raises on "gamma" in every call but batch 0's (the seed of batch 0 of shard s1, base 0)."""

    def sample(self, requests, sampling):
        self.fail_on = None if requests[0].seed == batch_seed(0, "s1", 0) else "gamma"
        return super().sample(requests, sampling)


def test_a_prompt_with_one_failed_sample_keeps_none_of_its_samples():
    b = FailsInLaterBatches(ModelConfig(backend="fake"))
    rows, quarantine = run(b, FIVE)
    # p2's first two samples succeed in batch 0, its third fails alone in batch 1: p2 is only in quarantine
    assert [q["prompt"] for q in quarantine] == ["p2 gamma"]
    assert [r["prompt"] for r in rows] == [t for t in FIVE if t != "p2 gamma" for _ in range(3)]


class AlwaysRaises(RecordingBackend):
    def __init__(self, cfg, exc):
        super().__init__(cfg)
        self.exc = exc

    def sample(self, requests, sampling):
        self.calls.append(([r.n for r in requests], "raised"))
        raise self.exc


def test_a_backend_that_always_raises_quarantines_every_prompt_once():
    stats = Counter()
    cfg = ModelConfig(backend="fake", params={"context_length": 300})
    b = AlwaysRaises(cfg, ValueError("x" * 300 + "\nsecond line"))
    texts = ["a b", "c d", "w " * 300, "e f"]  # the third does not fit the context
    rows, quarantine = run(b, texts, n=2, batch_size=4, stats=stats)
    assert rows == []
    # too long first (never generated), then each failed prompt once: none lost, none duplicated
    assert [(q["prompt"][:3], q["reason"]) for q in quarantine] == [
        ("w w", "too_long"), ("a b", "generation_error"), ("c d", "generation_error"), ("e f", "generation_error")
    ]
    assert quarantine[1]["detail"] == "ValueError: " + "x" * 200  # first line, cut at 200 characters
    # batch 0: requests [a b, c d] -> each alone; batch 1: [e f] alone, not split further (its 2 samples fail together)
    assert [ns for ns, _ in b.calls] == [[2, 2], [2], [2], [2]]
    assert stats == {"splits": 1, "generation_error": 3, "too_long": 1}


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(1)])
def test_interrupts_are_not_generation_errors(exc):
    # only Exception is caught: a user's Ctrl-C or an exit stops the shard at the first call
    b = AlwaysRaises(ModelConfig(backend="fake"), exc)
    with pytest.raises(type(exc)):
        run(b, FIVE)
    assert b.calls == [([3, 3, 2], "raised")]


def test_fake_backend_appends_its_pid_at_load(tmp_path):
    path = tmp_path / "pids"
    for _ in range(2):
        FakeBackend(ModelConfig(backend="fake", params={"pid_file": str(path)})).load()
    assert path.read_text() == f"{os.getpid()}\n" * 2
