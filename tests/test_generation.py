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

    def sample(self, requests, sampling, forcing=None):
        try:
            gens = super().sample(requests, sampling, forcing)
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

    def sample(self, requests, sampling, forcing=None):
        self.fail_on = None if requests[0].seed == batch_seed(0, "s1", 0) else "gamma"
        return super().sample(requests, sampling, forcing)


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

    def sample(self, requests, sampling, forcing=None):
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


# ---- budget forcing: the pure bookkeeping, the fake backend, the config ---------------------------------------

WORDS = ["<eos>", "a", "b", "</", "think>", "ans", "x"]  # id -> word; a word-level decode, "</think>" in two tokens
EOS = {0}


def decode(ids):
    return "".join(WORDS[i] for i in ids)


@pytest.mark.parametrize("ids, at", [
    ([1, 2, 3, 4, 5], 4),  # the close ends with its 4th token
    ([3, 4], 2),  # at once
    ([1, 3, 1, 4], None),  # its two halves apart: no close
    ([1, 2], None),
    ([], None),
])
def test_closed_at_is_where_the_close_is_complete(ids, at):
    from dafactory.tasks.generate.generation import closed_at

    assert closed_at(ids, decode, "</think>") == at


@pytest.mark.parametrize("raw, want", [
    # (ids, eos, close_end, append, answer_budget); reasoning budget 5, answer budget 4, forced ids [3, 4]
    ([1, 2, 1, 2, 1], ((1, 2, 1, 2, 1), False, None, (3, 4), 4)),  # open at the budget: forced
    ([1, 3, 4, 5, 5], ((1, 3, 4, 5, 5), False, 3, (), 2)),  # closed at 3: 2 answer tokens written, 2 left
    ([3, 4, 5, 5, 5], ((3, 4, 5, 5, 5), False, 2, (), 1)),
    ([1, 2, 3, 4, 5], ((1, 2, 3, 4, 5), False, 4, (), 3)),
    ([1, 2, 0, 7, 7], ((1, 2), True, None, None, 0)),  # EOS before the budget, open: ended
    ([3, 4, 5, 0, 0], ((3, 4, 5), True, 2, None, 0)),  # closed and answered within the phase: ended
])
def test_reasoning_phase_decides_the_answer_phase(raw, want):
    from dafactory.tasks.generate.generation import BudgetForcing, reasoning_phase

    p = reasoning_phase(raw, EOS, decode, BudgetForcing(5, 4, "</think>", "</think>"), [3, 4])
    assert (p.ids, p.eos, p.close_end, p.append, p.answer_budget) == want
    assert p.forced == (want[2] is None and want[3] is not None)


def test_a_closed_sample_whose_answer_filled_its_budget_has_no_answer_phase():
    from dafactory.tasks.generate.generation import BudgetForcing, forced_generation, reasoning_phase

    p = reasoning_phase([3, 4, 5, 5, 5], EOS, decode, BudgetForcing(5, 3, "</think>", "</think>"), [3, 4])
    assert (p.append, p.answer_budget) == (None, 0)
    g = forced_generation(p, [], EOS, decode, prompt_tokens=7)
    assert (g.finish_reason, g.reasoning_tokens, g.answer_tokens, g.reasoning_forced_close) == ("length", 2, 3, False)


@pytest.mark.parametrize("raw, answer, want", [
    # (token_ids, finish, forced, reasoning_tokens, answer_tokens, response_tokens)
    ([1, 2, 1, 2, 1], [5, 5, 0, 9], ((1, 2, 1, 2, 1, 3, 4, 5, 5), "stop", True, 5, 2, 9)),  # forced, EOS ends it
    ([1, 2, 1, 2, 1], [5, 5, 5, 5], ((1, 2, 1, 2, 1, 3, 4, 5, 5, 5, 5), "length", True, 5, 4, 11)),
    ([1, 3, 4, 5, 5], [5, 0], ((1, 3, 4, 5, 5, 5), "stop", False, 3, 3, 6)),  # closed by itself, went on
    ([1, 2, 0, 7, 7], [], ((1, 2), "stop", False, 2, 0, 2)),  # ended open: no answer phase
])
def test_forced_generation_counts_each_part(raw, answer, want):
    from dafactory.tasks.generate.generation import BudgetForcing, forced_generation, reasoning_phase

    p = reasoning_phase(raw, EOS, decode, BudgetForcing(5, 4, "</think>", "</think>"), [3, 4])
    g = forced_generation(p, answer, EOS, decode, prompt_tokens=7)
    assert (g.token_ids, g.finish_reason, g.reasoning_forced_close, g.reasoning_tokens, g.answer_tokens,
            g.response_tokens) == want
    assert g.text == decode(list(want[0])) and g.prompt_tokens == 7


def teacher_shard():
    from dafactory.tasks.distill.reasoning import TeacherPrompt
    from dafactory.tasks.distill.spec import load_spec

    rows = tuple(PromptRow(prompt_id(t), t, "benign", i, ("benign",)) for i, t in enumerate(
        ["bake a cake", "why is the sky blue", "how do magnets work"]))
    return Shard("s1", 0, rows), TeacherPrompt("{prompt}", load_spec(None))


def fake_teacher_rows(budget: int) -> list[dict]:
    s, teacher = teacher_shard()
    b = FakeBackend(ModelConfig(backend="fake"))
    sampling = SamplingConfig(max_new_tokens=64, reasoning_budget=budget, answer_budget=6)
    rows, quarantine = generate_shard(b, s, n=4, sampling=sampling, batch_size=5, conversation=teacher)
    assert quarantine == [] and len(rows) == 12
    return rows


@pytest.mark.parametrize("budget, forced, closed", [
    # the fake's traces think 10 to 25 words, then close with one more word or end open
    (8, 12, 0),  # every trace is still thinking at 8 words: all forced
    (18, 7, 4),  # some closed (or ended) within 18 words, some not
    (40, 0, 9),  # none reaches 40: 9 closed by themselves, 3 ended open
])
def test_fake_teacher_under_budget_forcing(budget, forced, closed):
    rows = fake_teacher_rows(budget)
    assert sum(r["reasoning_forced_close"] for r in rows) == forced
    assert sum(not r["reasoning_forced_close"] and "</think>" in r["response"] for r in rows) == closed
    # forced exactly the traces whose unforced reasoning (a budget none reaches) is longer than this budget
    natural = [r["reasoning_tokens"] for r in fake_teacher_rows(40)]
    assert [r["reasoning_forced_close"] for r in rows] == [n > budget for n in natural]
    for r in rows:
        words = r["response"].split()
        assert r["response_tokens"] == len(words) == len(r["response_token_ids"])
        assert r["answer_tokens"] <= 6 and r["reasoning_tokens"] <= budget
        if r["reasoning_forced_close"]:
            # the budget's words, the forced close (its one word), then the answer
            assert (r["reasoning_tokens"], words[budget]) == (budget, "</think>")
            assert r["response_tokens"] == budget + 1 + r["answer_tokens"]
        elif "</think>" in words:
            assert words.index("</think>") + 1 == r["reasoning_tokens"]
            assert r["response_tokens"] == r["reasoning_tokens"] + r["answer_tokens"]
    table = to_table(rows, GENERATED)
    assert table.column("reasoning_forced_close").to_pylist() == [r["reasoning_forced_close"] for r in rows]


def test_budget_forcing_off_leaves_the_rows_as_they_were():
    s, teacher = teacher_shard()
    b = FakeBackend(ModelConfig(backend="fake"))
    rows, _ = generate_shard(b, s, n=2, sampling=SamplingConfig(max_new_tokens=64), batch_size=8, conversation=teacher)
    assert {(r["reasoning_forced_close"], r["reasoning_tokens"], r["answer_tokens"]) for r in rows} == {
        (False, None, None)}


def test_budgets_bound_the_context_check_and_need_a_reasoning_conversation():
    from dafactory.tasks.errors import UserError

    s, teacher = teacher_shard()
    b = FakeBackend(ModelConfig(backend="fake", params={"context_length": 40}))
    # prompt words and <think> + 20 reasoning + 11 characters of "\n</think>\n\n" (a bound on its tokens)
    # + 5 answer: the first prompt's 4 words fit in 40, the others' 6 and 5 do not (max_new_tokens is not the bound)
    sampling = SamplingConfig(max_new_tokens=4, reasoning_budget=20, answer_budget=5)
    rows, quarantine = generate_shard(b, s, n=1, sampling=sampling, batch_size=8, conversation=teacher)
    assert [r["prompt"] for r in rows] == ["bake a cake"]
    assert [q["detail"] for q in quarantine] == ["6 prompt tokens + the response's budgets 36 > context 40",
                                                 "5 prompt tokens + the response's budgets 36 > context 40"]
    with pytest.raises(UserError, match="sampling.reasoning_budget needs a conversation that reasons"):
        generate_shard(b, s, n=1, sampling=sampling, batch_size=8, conversation=ChatPrompt())


@pytest.mark.parametrize("cls, overrides, error", [
    # an answer budget alone has nothing to follow: refused
    ("DistillConfig", ["sampling.answer_budget=8"], "invalid config: sampling: answer_budget needs reasoning_budget"),
    # budgets below one token
    ("DistillConfig", ["sampling.reasoning_budget=0"], "invalid config: sampling.reasoning_budget: Input should be"),
    # the preference and evaluation flows' students open no <think>
    ("PreferenceConfig", ["sampling.reasoning_budget=8"], "invalid config: config: sampling.reasoning_budget is for"),
    ("EvaluateConfig", ["sampling.reasoning_budget=8"], "invalid config: config: sampling.reasoning_budget is for"),
])
def test_budget_config_is_checked(cls, overrides, error):
    from dafactory.tasks import config
    from dafactory.tasks.errors import UserError

    with pytest.raises(UserError) as err:
        config.build_config(getattr(config, cls), None, overrides)
    assert str(err.value).startswith(error)


def test_budget_config_defaults():
    from dafactory.tasks.config import DistillConfig, build_config

    cfg = build_config(DistillConfig, None, ["sampling.reasoning_budget=64", "sampling.max_new_tokens=300"])
    assert (cfg.sampling.reasoning_budget, cfg.sampling.answer_budget, cfg.keep_forced_close) == (64, None, True)
    assert cfg.sampling.max_response_tokens(3) == 64 + 3 + 300  # the answer gets max_new_tokens
    assert SamplingConfig(max_new_tokens=9).max_response_tokens(3) == 9


def test_garbage_left_by_loading_is_collected_before_the_rest_is_frozen():
    """A replica's loading runs in gc_loading; cycles it dropped (temporary graphs, parsed configs) must not
    be frozen with what it keeps, or they live as long as the replica."""
    import gc
    import weakref

    from dafactory.tasks.run.stages import gc_loading

    class Node:
        def __init__(self):
            self.me = self
            self.payload = bytearray(1 << 20)

    kept = []
    try:
        with gc_loading():
            dropped = Node()  # a cycle: only a collection frees it
            gone = weakref.ref(dropped)
            kept.append(Node())  # what loading keeps
            del dropped
        assert gone() is None  # collected, not frozen for the replica's life
        assert kept[0].payload  # what was kept is still there
    finally:
        gc.unfreeze()  # this test process is not a replica


def test_a_rows_own_max_new_tokens_bounds_its_samples_and_its_context_check():
    # each prompt's rows equal those of the same shard generated with its budget as the sampling's max_new_tokens
    # (the fake backend's seeds depend on the call, not on the budget); the context check uses each row's own
    texts = ["how do I bake bread", "tell me about the moon", "write a poem on rain", "x " * 10]
    budgets = [2, None, 7, 3]
    s = Shard("s1", 0, tuple(PromptRow(prompt_id(t), t, None, i, max_new_tokens=m)
                             for i, (t, m) in enumerate(zip(texts, budgets))))
    b = FakeBackend(ModelConfig(backend="fake", params={"refusal_rate": 0.0, "context_length": 12}))
    rows, quarantine = generate_shard(b, s, n=2, sampling=SamplingConfig(max_new_tokens=1), batch_size=8,
                                      conversation=ChatPrompt())
    assert [q["detail"] for q in quarantine] == ["10 prompt tokens + the row's max_new_tokens 3 > context 12"]
    plain = Shard("s1", 0, tuple(PromptRow(r.prompt_id, r.prompt, None, r.source_row) for r in s.rows[:3]))
    for m, text in [(2, texts[0]), (1, texts[1]), (7, texts[2])]:
        alone, _ = generate_shard(b, plain, n=2, sampling=SamplingConfig(max_new_tokens=m), batch_size=8,
                                  conversation=ChatPrompt())
        assert [r for r in rows if r["prompt"] == text] == [r for r in alone if r["prompt"] == text]
    assert [(r["response_tokens"], r["finish_reason"]) for r in rows] == [
        (2, "length"), (2, "length"), (1, "length"), (1, "length"), (7, "length"), (7, "length")]
