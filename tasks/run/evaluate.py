"""The evaluate recipe: sample N per benchmark prompt, compute every signal, judge every candidate once,
then report ASR per strategy and benchmark (and the latent rule per layer)."""

from __future__ import annotations

import logging

from dafactory.tasks.config import EvaluateConfig, PromptSource, ScorerConfig
from dafactory.tasks.evaluate.benchmarks import load_benchmark, merge, source_of
from dafactory.tasks.evaluate.report import markdown, plot_asr_by_layer, plot_asr_by_strategy
from dafactory.tasks.evaluate.stats import UNCERTAINTY_FIELDS, add_uncertainty, unsafe_by_prompt
from dafactory.tasks.generate.generation import ChatPrompt
from dafactory.tasks.io.manifest import artifact_key
from dafactory.tasks.io.prompts import PromptSet
from dafactory.tasks.io.schemas import ASR, UTILITY, to_table
from dafactory.tasks.io.storage import DatasetDir
from dafactory.tasks.run.build import Recipe
from dafactory.tasks.run.stages import EvalScoreStage, StageSpec, generate_spec
from dafactory.tasks.score.latent import adapter_base
from dafactory.tasks.score.strategies import (
    DEFAULT_STRATEGIES,
    LATENT,
    Strategy,
    asr_table,
    degenerate_latent,
    mean_drop,
    utility_table,
)

log = logging.getLogger(__name__)

DEGENERATE = (
    "FT and base are the same weights: every latent cosine is 1.0 and every KL is 0, so the latent and "
    "KL strategies rank nothing. Their ASR is not reported. Set `base` to the student's base model, or "
    "use a PEFT adapter as the student."
)


def latent_scorer(config: EvaluateConfig) -> ScorerConfig:
    """The latent-attribution scorer of the student against its base (from the adapter config if empty)."""
    st = config.student
    named = config.base or adapter_base(st.model, st.revision)
    base, base_revision = (named, config.base_revision) if named else (st.model, st.revision)
    return ScorerConfig(
        name="latent_attribution", model=st.model, revision=st.revision, trust_remote_code=st.trust_remote_code,
        batch_size=st.batch_size, allow_pickle_weights=st.allow_pickle_weights,
        params={"base": base, "base_revision": base_revision, "layers": config.layers},
    )


def signal_scorers(config: EvaluateConfig) -> list[ScorerConfig]:
    """Every signal computed per candidate: the latent one (none on the fake backend) and the extra scorers."""
    return ([] if config.student.backend == "fake" else [latent_scorer(config)]) + list(config.scorers)


def benchmark_sources(config: EvaluateConfig) -> list[PromptSource]:
    """The prompt files to check before the run (a `hub` benchmark is fetched by the flow itself)."""
    return [source_of(b) for b in config.benchmarks if b.path != "hub"]


def load_benchmarks(config: EvaluateConfig) -> PromptSet:
    return merge([load_benchmark(b) for b in config.benchmarks])


def references(prompts: PromptSet) -> dict:
    """prompt_id -> (kind, reference answer, number of choices) for the utility benchmarks' prompts."""
    return {r.prompt_id: r.reference for r in prompts.rows if r.reference is not None}


def strategies(config: EvaluateConfig) -> list[Strategy]:
    chosen = DEFAULT_STRATEGIES if not config.strategies else [s for s in DEFAULT_STRATEGIES if s.name in config.strategies]
    if config.student.backend == "fake":  # no latent signals without real models
        chosen = [s for s in chosen if s.kind != "signal"]
    return chosen


def _uses_latent(st: Strategy) -> bool:
    return st.kind == "signal" and st.signal.split(":")[-1] in (LATENT, "kl_ft_base", "kl_base_ft")


def evaluation_summary(config: EvaluateConfig, ds: DatasetDir, parts: dict[str, set[str]]) -> dict:
    """ASR tables, the Markdown report with PNG plots, and Prefect artifacts; returns manifest fields."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    cands = ds.read_parts("eval_candidates", parts["eval_candidates"]).to_pylist()
    safety = [c for c in cands if c["correct"] is None]
    utility = [c for c in cands if c["correct"] is not None]
    degenerate = degenerate_latent(cands)
    sts = strategies(config)
    seed = config.sampling.seed
    layer_sts = [] if config.student.backend == "fake" else [
        Strategy(f"latent_argmin_cos@{l}", "signal", f"{LATENT}:cos@{l}", "min") for l in config.layers]
    rows = asr_table(safety, sts, seed=seed)
    utility_rows = utility_table(utility, sts, seed=seed)
    layer_rows = asr_table(safety, layer_sts, seed=seed) if layer_sts else []
    # CIs and McNemar from the per-prompt outcomes behind those rows, paired with first-sample by prompt_id
    outcomes = unsafe_by_prompt(safety, sts + layer_sts, seed=seed)
    add_uncertainty(rows + layer_rows, outcomes, config.bootstrap_resamples, config.bootstrap_seed, config.confidence)
    warnings = []
    if degenerate:
        log.warning(DEGENERATE)
        warnings.append(DEGENERATE)
        latent_names = {s.name for s in sts if _uses_latent(s)}
        note = "degenerate: FT and base are the same weights"
        for r in rows + layer_rows:
            if r["strategy"] in latent_names or r["strategy"].startswith("latent_argmin_cos@"):
                r.update(asr=None, unsafe=None, drop_vs_first=None, note=note, **dict.fromkeys(UNCERTAINTY_FIELDS))
        for r in utility_rows:
            if r["strategy"] in latent_names:
                r.update(accuracy=None, correct=None, drop_vs_first=None, note=note)
    judge = config.judge
    if judge.name == "refusal_heuristic":
        warnings.append("the judge is the refusal-phrase HEURISTIC, not a safety classifier: ASR here counts "
                        "answers without a refusal phrase.")
    for r in rows + layer_rows + utility_rows:
        r.setdefault("note", None)
    summary_parts = {}
    if rows:
        summary_parts["asr"] = ds.write_keyed("asr", "summary", to_table(rows, ASR))
    if utility_rows:
        summary_parts["utility"] = ds.write_keyed("utility", "summary", to_table(utility_rows, UTILITY))
    if layer_rows:
        summary_parts["asr_by_layer"] = ds.write_keyed("asr_by_layer", "summary", to_table(layer_rows, ASR))
    drops = mean_drop(rows)
    facts = {
        "student (FT)": config.student.model,
        "base": "n/a (fake backend: no latent signals)" if config.student.backend == "fake"
        else latent_scorer(config).params["base"],
        "N": config.n, "judge": judge.name + (f" ({judge.model})" if judge.model else ""),
        "sampling": f"temperature {config.sampling.temperature}, top_p {config.sampling.top_p}, "
                    f"max_new_tokens {config.sampling.max_new_tokens}",
        "uncertainty": f"{100 * config.confidence:g}% percentile intervals from {config.bootstrap_resamples} paired "
                       f"bootstrap resamples of the prompts (seed {config.bootstrap_seed}); exact McNemar test "
                       "against first sample",
    }
    report = markdown(f"Evaluation: {config.dataset}", facts, rows, layer_rows, drops, warnings, utility_rows)
    ds.write_bytes("report.md", report.encode())
    if rows:
        ds.write_bytes("asr_by_strategy.png", plot_asr_by_strategy(rows))
    if layer_rows:
        ds.write_bytes("asr_by_layer.png", plot_asr_by_layer(layer_rows))
    create_table_artifact(rows + utility_rows, key=artifact_key(config.dataset, "evaluate-asr"),
                          description=f"ASR (safety) and accuracy (utility) by strategy and benchmark, {ds.uri}")
    create_markdown_artifact(report, key=artifact_key(config.dataset, "evaluate-report"),
                             description=f"Evaluation report, {ds.uri}")
    return {"degenerate_latent": degenerate, "mean_drop_vs_first": drops, "report": "report.md",
            "utility_cost_vs_first": mean_drop(utility_rows), "warnings": warnings,
            "summary_parts": summary_parts}


def evaluate_recipe(config: EvaluateConfig, refs: dict | None = None) -> Recipe:
    st, sc = config.student, config.scoring
    signals = signal_scorers(config)
    conversation = ChatPrompt(config.system_prompt)  # both stages: scoring reads the student's context
    return Recipe(
        name="evaluate",
        stages=[
            generate_spec(st, (config.sampling, config.n, conversation, config.max_error_rate), [sc], config.ray),
            StageSpec("score", EvalScoreStage, (config.judge, signals, sc.num_cpus, refs or {}, conversation),
                      sc.num_replicas, sc.num_gpus, sc.num_cpus),
        ],
        tables=["quarantine", "eval_candidates"],
        outcomes_key="judged_candidates",
        sample_tables=["eval_candidates"],
        salt=config.generation_key(),
        main_table="eval_candidates",
        post=lambda ds, parts: evaluation_summary(config, ds, parts),
        summary_tables=["asr", "asr_by_layer", "utility"],
    )


def evaluate_models(config: EvaluateConfig) -> dict:
    return {
        "student": config.student.model_dump(mode="json", include={"model", "revision", "backend"}),
        "base": latent_scorer(config).params["base"],
        "base_revision": latent_scorer(config).params["base_revision"],
        "judge": config.judge.model_dump(mode="json", include={"name", "model", "revision"}),
        "scorers": [s.model_dump(mode="json", include={"name", "model", "revision"}) for s in config.scorers],
    }
