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
