"""vLLM generation backend (`backend: vllm`, extra `dafactory[vllm]`): continuous batching and prefix caching.

One `vllm.LLM` per backend (so one per Ray actor), loaded in `load()`; nothing of vLLM or torch is imported
before that, and the backend pickles until it is loaded. Prompts are rendered by the model's Hugging Face
tokenizer with the same chat template logic as the `hf` backend and handed to vLLM as token ids, so both
backends sample from the same prompt tokens.

A replica's threads (its shards in flight, each shard's batches) share the one engine through an EngineFeed
(tasks/generate/feed.py): requests go in between the engine's steps, so the next shards' requests run while the
current shard's longest samples finish.

Each request is one `SamplingParams(n, seed)`: its samples share the prompt's KV blocks, and the seed is per
request, so a request's samples do not depend on what else is in the batch. Greedy requests (temperature 0)
are sampled once and repeated n times (vLLM refuses n > 1 under greedy decoding; the samples would be equal).
The text is decoded once by the Hugging Face tokenizer from the kept ids (EOS excluded, special tokens
skipped); vLLM's own detokenizer is off.

params: `max_model_len` (the engine's context; the model's own if unset), `gpu_memory_utilization` (the
share of GPU memory vLLM may take; on a vLLM CPU build, the share of the NUMA node's RAM), `engine_kwargs`
(a dict passed to `vllm.LLM` as is, overriding ours: `dtype`, `enforce_eager`, `kv_cache_memory_bytes`,
`distributed_executor_backend`, ...). `tensor_parallel_size` is the replica's `num_gpus` (at least 1).
"""

from __future__ import annotations

import logging
import threading

from dafactory.tasks.config import ModelConfig, SamplingConfig
from dafactory.tasks.errors import UserError
from dafactory.tasks.generate.backends.hf import render_ids, stop_ids
from dafactory.tasks.generate.feed import EngineFeed
from dafactory.tasks.generate.generation import (
    Backend,
    BudgetForcing,
    Generation,
    Request,
    forced_generation,
    forcing_codec,
    reasoning_phase,
    request_seed,
)
from dafactory.tasks.generate.models import load_tokenizer, resolve

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'dafactory[vllm]'"
PARAMS = ("max_model_len", "gpu_memory_utilization", "engine_kwargs")
FINISH_REASONS = {"stop": "stop", "length": "length"}


def check_params(params: dict) -> None:
    """A one-line UserError on options the backend does not know or cannot use, before any model loads."""
    unknown = sorted(set(params) - set(PARAMS))
    if unknown:
        raise UserError(f"unknown vllm backend params {unknown}; known: {', '.join(PARAMS)}")
    max_len = params.get("max_model_len")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
        raise UserError(f"vllm params.max_model_len must be a positive integer, got {max_len!r}")
    util = params.get("gpu_memory_utilization")
    if util is not None and (isinstance(util, bool) or not isinstance(util, (int, float)) or not 0 < util <= 1):
        raise UserError(f"vllm params.gpu_memory_utilization must be in (0, 1], got {util!r}")
    kwargs = params.get("engine_kwargs", {})
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise UserError(f"vllm params.engine_kwargs must be a mapping of vllm.LLM arguments, got {kwargs!r}")


def tensor_parallel_size(num_gpus: float) -> int:
    """GPUs one replica shards its model over: its whole GPUs, at least 1 (a fraction shares one GPU)."""
    if num_gpus > 1 and num_gpus != int(num_gpus):
        raise UserError(f"the vllm backend shards a model over whole GPUs: num_gpus {num_gpus:g} is not whole")
    return max(1, int(num_gpus))


class Steps:
    """vLLM's LLMEngine as an EngineFeed's engine: requests are added between steps, as LLM.generate adds all of
    its own before it steps (the same calls: add_request with FINAL_ONLY outputs, step, finished outputs).
    `running` is our count: the samples of our unfinished requests, at most the scheduler's max_num_seqs (an
    upper bound: a request's samples that ended before its last are counted until it ends)."""

    def __init__(self, engine):
        self.engine = engine
        self.limit = engine.vllm_config.scheduler_config.max_num_seqs
        self._n: dict[str, int] = {}  # request id -> samples, until it finishes

    def add(self, key, item) -> None:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        prompt_ids, params = item
        params.output_kind = RequestOutputKind.FINAL_ONLY
        self.engine.add_request(str(key), TokensPrompt(prompt_token_ids=list(prompt_ids)), params)
        self._n[str(key)] = params.n

    def step(self) -> tuple[list, int]:
        running, finished = min(self.limit, sum(self._n.values())), []
        for out in self.engine.step():
            if out.finished:
                self._n.pop(out.request_id, None)
                finished.append((int(out.request_id), sorted(out.outputs, key=lambda c: c.index)))
        return finished, running

    def reset(self) -> None:
        ids, self._n = list(self._n), {}
        try:
            self.engine.abort_request(ids)
        except Exception as exc:  # a dead engine: its requests are gone with it
            log.warning("vLLM could not abort %d requests after a failed step: %s", len(ids), exc)


class VLLMBackend(Backend):
    def __init__(self, cfg: ModelConfig):
        check_params(cfg.params)
        self.cfg = cfg
        self.tp = tensor_parallel_size(cfg.num_gpus)
        self.model_id = cfg.model
        self.revision = cfg.revision
        self.llm = self.tok = None
        self.eos_ids: set[int] = set()

    def load(self) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(f"the vllm backend needs vLLM, which is not installed ({exc}): {INSTALL_HINT}") from exc
        import torch

        resolved = resolve(self.cfg.model, self.cfg.revision, self.cfg.allow_pickle_weights)
        hub_revision = resolved.revision if resolved.source == resolved.model_id else None
        self.tok = load_tokenizer(resolved, self.cfg.trust_remote_code, padding_side="left")
        params = self.cfg.params
        kwargs = dict(
            model=resolved.source,
            tokenizer=resolved.source,
            revision=hub_revision,
            tokenizer_revision=hub_revision,
            trust_remote_code=self.cfg.trust_remote_code,
            # bf16 on CUDA like the hf backend; float32 on CPU, where the hf backend runs it too.
            dtype="bfloat16" if torch.cuda.is_available() else "float32",
            enable_prefix_caching=True,
            tensor_parallel_size=self.tp,
            seed=0,  # every request carries its own seed; this one only seeds the engine
        )
        if not torch.cuda.is_available():
            # vLLM's CPU build crashes ("CPU Generator does not use offset") when a seeded request's prompt is
            # prefilled in chunks, as it is once a step's prompts pass max_num_batched_tokens: whole prompts.
            kwargs["enable_chunked_prefill"] = False
        kwargs.update({k: params[k] for k in ("max_model_len", "gpu_memory_utilization") if k in params})
        kwargs.update(params.get("engine_kwargs", {}))
        self.llm = vllm.LLM(**kwargs)
        self.feed = EngineFeed(Steps(self.llm.llm_engine))
        self._rendering = threading.Lock()  # made here: the backend pickles until it is loaded
        self.model_id = resolved.model_id
        self.revision = self._commit(resolved)
        generation = self.llm.llm_engine.model_config.try_get_generation_config()
        self.eos_ids = stop_ids(self.tok, generation.get("eos_token_id"))
        log.info("loaded %s (%s) in vLLM %s, tensor parallel %d", self.model_id, self.revision, vllm.__version__,
                 self.tp)

    def _commit(self, resolved) -> str | None:
        """The Hub commit of the weights vLLM loaded when the Hub cache knows it; otherwise the requested
        revision (a local folder or the embedded default: what `resolve` recorded)."""
        if resolved.source != resolved.model_id:
            return resolved.revision
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(resolved.source, "config.json", revision=resolved.revision)
        # <cache>/models--org--name/snapshots/<commit>/config.json
        return path.split("/")[-2] if isinstance(path, str) and "/snapshots/" in path else resolved.revision

    def context_length(self) -> int | None:
        return self.llm.llm_engine.model_config.max_model_len

    def render(self, conversations: list[list[dict]], prefill: str = "") -> list[list[int]]:
        with self._rendering:  # a replica's threads share the tokenizer, whose batch call sets its padding state
            return render_ids(self.tok, conversations, prefill)


    @staticmethod
    def _params(sampling: SamplingConfig, n: int, seed: int, max_tokens: int):
        from vllm import SamplingParams

        knobs = dict(temperature=0.0) if sampling.temperature == 0 else dict(
            temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or -1  # -1: none
        )
        return SamplingParams(n=n, seed=seed, max_tokens=max_tokens, detokenize=False, **knobs)

    def _run(self, prompts: list[tuple[int, ...]], params: list) -> list[list]:
        """Each prompt's completions, in sample order: through the replica's one engine, beside whatever else its
        threads have in it (the shards in flight)."""
        return self.feed.run(list(zip(prompts, params)))

    def sample(self, requests: list[Request], sampling: SamplingConfig,
               forcing: BudgetForcing | None = None) -> list[list[Generation]]:
        """With `forcing`, budget forcing: a reasoning phase of forcing.reasoning tokens, then, for each sample that
        did not end, a request of its own for the answer whose prompt is prompt + reasoning (+ the forced close),
        seeded from its request's seed and sample index; prefix caching finds the prompt's KV blocks (and the
        reasoning's full ones) cached."""
        if not requests:
            return []
        greedy = sampling.temperature == 0
        params = [self._params(sampling, 1 if greedy else r.n, r.seed,
                               r.budget(sampling) if forcing is None else forcing.reasoning) for r in requests]
        done = self._run([r.prompt_ids for r in requests], params)
        if forcing is not None:
            out = self._forced(requests, done, sampling, forcing)
        else:
            out = [[self._generation(c, len(r.prompt_ids)) for c in cs] for r, cs in zip(requests, done)]
        return [gens * r.n if greedy else gens for r, gens in zip(requests, out)]

    def _forced(self, requests: list[Request], done: list[list], sampling: SamplingConfig,
                forcing: BudgetForcing) -> list[list[Generation]]:
        forced_ids, decode_all, decode_text = forcing_codec(self.tok, forcing)
        phases = [[reasoning_phase(list(c.token_ids), self.eos_ids, decode_all, forcing, forced_ids) for c in cs]
                  for cs in done]
        going = [(i, k) for i, ps in enumerate(phases) for k, p in enumerate(ps) if p.append is not None]
        answers = {}
        if going:
            prompts = [requests[i].prompt_ids + phases[i][k].ids + phases[i][k].append for i, k in going]
            params = [self._params(sampling, 1, request_seed(requests[i].seed, 1 + k), phases[i][k].answer_budget)
                      for i, k in going]
            answers = {ik: list(cs[0].token_ids) for ik, cs in zip(going, self._run(prompts, params))}
        return [[forced_generation(p, answers.get((i, k), []), self.eos_ids, decode_text, len(requests[i].prompt_ids))
                 for k, p in enumerate(ps)] for i, ps in enumerate(phases)]

    def _generation(self, completion, prompt_tokens: int) -> Generation:
        reason = FINISH_REASONS.get(completion.finish_reason)
        if reason is None:
            log.warning("vLLM finished a sample with %r; recorded as 'stop'", completion.finish_reason)
            reason = "stop"
        ids = list(completion.token_ids)
        if reason == "stop" and ids and ids[-1] in self.eos_ids:
            ids = ids[:-1]
        return Generation(
            text=self.tok.decode(ids, skip_special_tokens=True),
            finish_reason=reason,
            prompt_tokens=prompt_tokens,
            response_tokens=len(ids),
            token_ids=tuple(ids),
        )

