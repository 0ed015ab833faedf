"""The transformers backend's engines against an independent greedy reference, on a tiny random model in float32.

The reference decodes one prompt at a time, unpadded, with a full forward pass per token and no cache: nothing
of generate(), of the engines or of their padding. Each engine gets the prompts together, of different lengths
(left padding), with several samples each.
"""

import pytest

from dafactory.tasks.config import ModelConfig, SamplingConfig
from dafactory.tasks.errors import UserError
from dafactory.tasks.generate.backends.engines import ENGINES
from dafactory.tasks.generate.generation import Request

ENGINE_NAMES = ["generate", "static", "paged"]
CONVERSATIONS = [  # three prompt lengths
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "you are helpful"}, {"role": "user", "content": "how do i make a cake please"}],
    [{"role": "user", "content": "is the sky blue"}],
]
SAMPLES = [2, 1, 3]
NEW = 8


def backend(path, engine):
    from dafactory.tasks.generate.backends.hf import HFBackend

    b = HFBackend(ModelConfig(model=path, params={"engine": engine}))
    b.load()
    return b


def greedy_reference(model, prompt: list[int], steps: int) -> list[int]:
    import torch

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.fixture(scope="module")
def reference(tiny_models):
    b = backend(tiny_models["lm"], "generate")
    prompts = b.render(CONVERSATIONS)
    return prompts, [greedy_reference(b.model, p, NEW) for p in prompts]


def test_the_engines_are_registered():
    assert ENGINES.names() == sorted(ENGINE_NAMES)


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_greedy_equals_the_reference_token_for_token(tiny_models, reference, engine):
    prompts, expected = reference
    assert len({len(p) for p in prompts}) == 3  # different lengths: the batch is left-padded
    b = backend(tiny_models["lm"], engine)
    b.eos_ids = set()  # no EOS: every sample runs to max_new_tokens
    requests = [Request(tuple(p), n, seed=5) for p, n in zip(prompts, SAMPLES)]
    out = b.sample(requests, SamplingConfig(temperature=0, max_new_tokens=NEW))
    assert [[g.token_ids for g in gens] for gens in out] == [[tuple(e)] * n for e, n in zip(expected, SAMPLES)]
    assert {g.finish_reason for gens in out for g in gens} == {"length"}
    assert [[g.prompt_tokens for g in gens] for gens in out] == [[len(p)] * n for p, n in zip(prompts, SAMPLES)]


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_eos_stops_a_sample_with_finish_reason_stop(tiny_models, reference, engine):
    prompts, expected = reference
    # EOS is a token the first prompt's greedy continuation reaches at step 3 and some other prompt's never does
    eos = next(t for t in expected[0][3:] if any(t not in e for e in expected[1:]))
    cut = [e[: e.index(eos)] if eos in e else e for e in expected]
    reasons = ["stop" if eos in e else "length" for e in expected]
    assert set(reasons) == {"stop", "length"}
    b = backend(tiny_models["lm"], engine)
    b.eos_ids = {eos}
    requests = [Request(tuple(p), n, seed=5) for p, n in zip(prompts, SAMPLES)]
    out = b.sample(requests, SamplingConfig(temperature=0, max_new_tokens=NEW))
    assert [[(g.token_ids, g.finish_reason, g.response_tokens) for g in gens] for gens in out] == [
        [(tuple(c), r, len(c))] * n for c, r, n in zip(cut, reasons, SAMPLES)
    ]


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_sampling_is_reproducible_and_seeded(tiny_models, reference, engine):
    prompts, _ = reference
    b = backend(tiny_models["lm"], engine)
    s = SamplingConfig(temperature=1.0, max_new_tokens=NEW)

    def ids(seed):
        out = b.sample([Request(tuple(p), n, seed) for p, n in zip(prompts, SAMPLES)], s)
        return [[g.token_ids for g in gens] for gens in out]

    first = ids(3)
    assert [len(x) for x in first] == SAMPLES
    assert ids(3) == first
    assert ids(4) != first


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_each_request_stops_at_its_own_max_new_tokens(tiny_models, reference, engine):
    # one call, three requests: budgets of 3 and 5 tokens and the sampling's (NEW); greedy gives each the
    # reference's first tokens up to its own budget
    prompts, expected = reference
    b = backend(tiny_models["lm"], engine)
    b.eos_ids = set()
    budgets = [3, None, 5]
    requests = [Request(tuple(p), n, 5, m) for p, n, m in zip(prompts, SAMPLES, budgets)]
    out = b.sample(requests, SamplingConfig(temperature=0, max_new_tokens=NEW))
    assert [[g.token_ids for g in gens] for gens in out] == [
        [tuple(e[: m or NEW])] * n for e, n, m in zip(expected, SAMPLES, budgets)]
    assert {g.finish_reason for gens in out for g in gens} == {"length"}
    if engine == "paged":  # its schedule (and so its draws) depends on the lengths: greedy only
        return
    # sampled: a request's tokens are those it gets when the whole call runs to the largest budget, cut
    s = SamplingConfig(temperature=1.0, max_new_tokens=NEW)
    full = b.sample([Request(r.prompt_ids, r.n, r.seed) for r in requests], s)
    own = b.sample(requests, s)
    assert [[g.token_ids for g in gens] for gens in own] == [
        [g.token_ids[: m or NEW] for g in gens] for gens, m in zip(full, budgets)]
    assert [len(g.token_ids) for gens in own for g in gens] == [3, 3, NEW, 5, 5, 5]


def test_generate_is_render_then_sample(tiny_models, reference):
    # the judges' call: one greedy sample per conversation, the same ids as the reference
    prompts, expected = reference
    b = backend(tiny_models["lm"], "static")
    b.eos_ids = set()
    gens = b.generate(CONVERSATIONS, SamplingConfig(temperature=0, max_new_tokens=NEW), seed=0)
    assert [list(g.token_ids) for g in gens] == expected
    assert b.count_prompt_tokens(CONVERSATIONS) == [len(p) for p in prompts]


@pytest.mark.parametrize(
    "params, message",
    [
        # a typo, with a suggestion
        ({"engine": "pagd"}, "unknown engine 'pagd': did you mean 'paged'?"),
        # not an engine at all: the known ones are listed
        ({"engine": "vllm"}, "unknown engine 'vllm': known: generate, paged, static"),
    ],
)
def test_a_bad_engine_name_fails_before_the_model_loads(params, message):
    from dafactory.tasks.generate.backends.hf import HFBackend

    with pytest.raises(UserError) as err:
        HFBackend(ModelConfig(model="/nonexistent", params=params))
    assert str(err.value).startswith(message)


def test_the_backends_run_without_prefect_and_ray(tiny_models):
    # the GPU machine has neither: a fresh interpreter where importing them fails loads and samples a tiny model
    import subprocess
    import sys

    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("prefect", "ray"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from dafactory.tasks.config import ModelConfig, SamplingConfig
from dafactory.tasks.generate.backends.hf import HFBackend
from dafactory.tasks.generate.generation import Request
b = HFBackend(ModelConfig(model={tiny_models["lm"]!r}, params={{"engine": "static"}}))
b.load()
(gens,) = b.sample([Request(tuple(b.render([[{{"role": "user", "content": "hello"}}]])[0]), 2)],
                   SamplingConfig(temperature=0, max_new_tokens=3))
assert len(gens) == 2
assert not any(m.split(".")[0] in ("prefect", "ray") for m in sys.modules)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


# Budget forcing: a reasoning phase of REASONING tokens, then an answer phase of at most ANSWER tokens, in one sequence.
REASONING, ANSWER, FORCED = 6, 4, "yes answer"  # the forced close: two words of the tiny vocabulary


def self_closing_text(tok, expected: list[list[int]]) -> tuple[str, int]:
    """(the text of some tokens the first prompt's greedy continuation ends at step j, j): made the reasoning's
    close, the first prompt closes by itself there and the others (whose first REASONING tokens' text does not
    hold it) reach the budget open."""
    def text(ids):
        return tok.decode(ids, skip_special_tokens=False)

    for j in range(1, REASONING - 1):
        for a in range(j, -1, -1):
            close = text(expected[0][a : j + 1])
            if close.strip() and close not in text(expected[0][:j]) and all(
                close not in text(e[:REASONING]) for e in expected[1:]
            ):
                return close, j
    raise AssertionError("no text of the reference closes the first prompt alone")


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_budget_forcing_equals_the_reference_token_for_token(tiny_models, reference, engine):
    from dafactory.tasks.generate.generation import BudgetForcing

    prompts, expected = reference
    b = backend(tiny_models["lm"], engine)
    b.eos_ids = set()  # no EOS: every sample reasons to its close or its budget and answers to its budget
    close, j = self_closing_text(b.tok, expected)
    forced_ids = b.tok(FORCED, add_special_tokens=False)["input_ids"]
    assert len(forced_ids) == 2
    # The references, from the model alone: the first prompt closed at step j, so its sequence simply goes on
    # (ANSWER tokens after the close); the others reach the budget open, get the forced ids and answer from the
    # whole sequence, decoded without a cache.
    want = [(tuple(greedy_reference(b.model, prompts[0], j + 1 + ANSWER)), False, j + 1, ANSWER)]
    for p in prompts[1:]:
        reasoning = greedy_reference(b.model, p, REASONING)
        answer = greedy_reference(b.model, list(p) + reasoning + forced_ids, ANSWER)
        want.append((tuple(reasoning + forced_ids + answer), True, REASONING, ANSWER))
    forcing = BudgetForcing(REASONING, ANSWER, close, FORCED)
    requests = [Request(tuple(p), n, seed=5) for p, n in zip(prompts, SAMPLES)]
    out = b.sample(requests, SamplingConfig(temperature=0, max_new_tokens=NEW), forcing)
    got = [[(g.token_ids, g.reasoning_forced_close, g.reasoning_tokens, g.answer_tokens) for g in gens] for gens in out]
    assert got == [[w] * n for w, n in zip(want, SAMPLES)]
    for gens, w in zip(out, want):
        for g in gens:
            # finished by the answer budget; every token counted: reasoning, the forced ids, the answer
            assert (g.finish_reason, g.response_tokens) == ("length", len(w[0]))
            assert g.text == b.tok.decode(list(w[0]), skip_special_tokens=True)


@pytest.mark.parametrize("engine", ["generate", "static"])
def test_budget_forcing_continues_from_the_cache_without_prefilling_again(tiny_models, reference, engine):
    # every forward pass the model runs, by how many tokens it feeds: the prompts once (the first pass), then one
    # token a step, and for the answer phase the reasoning phase's last token and the forced ids (3), never more
    from dafactory.tasks.generate.generation import BudgetForcing

    prompts, expected = reference
    b = backend(tiny_models["lm"], engine)
    b.eos_ids = set()
    close, _ = self_closing_text(b.tok, expected)
    fed, rows = [], []

    def record(module, args, kw):
        rows.append(kw["input_ids"].shape[0])
        fed.append(kw["input_ids"].shape[1])

    hook = b.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        b.sample([Request(tuple(p), n, seed=5) for p, n in zip(prompts, SAMPLES)],
                 SamplingConfig(temperature=0, max_new_tokens=NEW), BudgetForcing(REASONING, ANSWER, close, FORCED))
    finally:
        hook.remove()
    width = max(len(p) for p in prompts)
    # both prefill each prompt once for its samples (a row per prompt), all but its last token
    assert (rows[0], fed[0]) == (len(prompts), width - 1)
    assert rows[1] == sum(SAMPLES) and fed[1] == 1  # then generate feeds the last prompt token of every sample
    assert max(fed[1:]) == 3 and fed.count(3) == 1  # the forced close's row group, once


def test_paged_budget_forcing_never_prefills_the_prompt_again(tiny_models, reference, caplog):
    # The paged engine's answer phase is a new request of prompt + reasoning + forced ids: the cache's prefix
    # sharing must find every prompt token (in complete pages) and the first reasoning tokens, so that only the
    # reasoning's last partial page and the forced ids are prefilled again. transformers logs each match.
    import logging
    import re

    from dafactory.tasks.generate.backends.engines import forced_page
    from dafactory.tasks.generate.generation import BudgetForcing

    assert [forced_page(r) for r in (3, 6, 7, 200, 254, 255, 2048)] == [4, 4, 8, 128, 128, 256, 256]
    prompts, expected = reference
    b = backend(tiny_models["lm"], "paged")
    b.eos_ids = set()
    close, j = self_closing_text(b.tok, expected)
    page = forced_page(REASONING)
    with caplog.at_level(logging.DEBUG, logger="ContinuousBatchingLogger"):
        out = b.sample([Request(tuple(p), n, seed=5) for p, n in zip(prompts, SAMPLES)],
                       SamplingConfig(temperature=0, max_new_tokens=NEW),
                       BudgetForcing(REASONING, ANSWER, close, FORCED))
    found = (re.search(r"prefix match of (\d+) tokens", r.getMessage()) for r in caplog.records)
    matches = [int(m.group(1)) for m in found if m]
    # the samples that answer after a forced close: the second and third prompts (1 + 3 samples); the first
    # closed by itself. Each answer request finds the complete pages of its prompt and reasoning so far (the
    # reasoning's last token has no KV yet), which hold the whole prompt.
    going = [len(p) for p, n in zip(prompts[1:], SAMPLES[1:]) for _ in range(n)]
    answer_matches = matches[-len(going):]
    assert answer_matches == [(length + REASONING - 1) // page * page for length in going]
    assert all(m >= length for m, length in zip(answer_matches, going))
    assert [g.reasoning_forced_close for g in out[1] + out[2]] == [True] * 4
