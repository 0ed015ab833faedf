"""The preference recipe: generate N candidates per prompt, score, select best-of-N and pairs."""

from __future__ import annotations

from dafactory.tasks.config import PreferenceConfig
from dafactory.tasks.generate.generation import ChatPrompt
from dafactory.tasks.run.build import Recipe
from dafactory.tasks.run.stages import ScoreSelectStage, StageSpec, generate_spec
from dafactory.tasks.score.selection import ranking_signal


def preference_recipe(config: PreferenceConfig) -> Recipe:
    st, sc = config.student, config.scoring
    conversation = ChatPrompt(config.system_prompt)  # both stages: scoring reads the student's context
    return Recipe(
        name="preference",
        stages=[
            generate_spec(st, (config.sampling, config.n, conversation, config.max_error_rate), [sc], config.ray),
            StageSpec("score", ScoreSelectStage,
                      (config.scorers, config.selection, ranking_signal(config.selection, [s.name for s in config.scorers]),
                       conversation, sc.num_cpus, config.sampling.seed),
                      sc.num_replicas, sc.num_gpus, sc.num_cpus),
        ],
        tables=["pairs", "best", "quarantine", "candidates"],
        outcomes_key="unpaired_prompts",
        sample_tables=["candidates"],
        one_row_per_prompt=["pairs", "best"],
        salt=config.generation_key(),
        main_table="pairs",
    )


def preference_models(config: PreferenceConfig) -> dict:
    return {
        "student": config.student.model_dump(mode="json", include={"model", "revision", "backend"}),
        "scorers": [s.model_dump(mode="json", include={"name", "model", "revision"}) for s in config.scorers],
    }
