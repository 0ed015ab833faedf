"""The distill recipe: a teacher reasons under the safety spec; samples are parsed, judged and filtered."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from dafactory.tasks.config import DistillConfig
from dafactory.tasks.distill.reasoning import TeacherPrompt, load_template
from dafactory.tasks.distill.spec import Spec, load_spec
from dafactory.tasks.errors import UserError
from dafactory.tasks.io.prompts import iter_prompts
from dafactory.tasks.run.build import Recipe
from dafactory.tasks.run.screening import LazyScreen
from dafactory.tasks.run.stages import JudgeFilterStage, StageSpec, generate_spec


@dataclass(frozen=True)
class DistillSetup:
    spec: Spec
    template: str
    template_source: str
    teacher_prompt: TeacherPrompt

    @property
    def template_sha256(self) -> str:
        return hashlib.sha256(self.template.encode()).hexdigest()


def setup(config: DistillConfig) -> DistillSetup:
    """Load spec and template; bad ones fail here, before any model loads."""
    spec = load_spec(config.spec)
    template, source = load_template(config.template)
    return DistillSetup(spec, template, source, TeacherPrompt(template, spec, config.missing_category))


def check_categories(config: DistillConfig, ds: DistillSetup) -> None:
    """Every row's categories must be known to the spec (or the benign policy must cover it)."""
    if config.prompts.category_column is None and config.missing_category == "error":
        raise UserError("distillation needs categories: set prompts.category_column (or missing_category: benign)")
    for batch in iter_prompts(config.prompts):
        for row in batch.rows:
            ds.teacher_prompt.check(row)


def screen(config: DistillConfig, ds: DistillSetup) -> LazyScreen:
    """Per batch of a prompt stream: check categories against the spec, then decontaminate and dedup over
    the whole input (tasks/screen/rules.py)."""
    return LazyScreen(config, check=ds.teacher_prompt.check)


def distill_recipe(config: DistillConfig, ds: DistillSetup) -> Recipe:
    t, j = config.teacher, config.judging
    return Recipe(
        name="distill",
        stages=[
            generate_spec(t, (config.sampling, config.k, ds.teacher_prompt, config.max_error_rate), [j], config.ray),
            StageSpec("judge", JudgeFilterStage,
                      (config.judges, config.student_system_prompt, j.num_cpus, config.keep_forced_close,
                       config.keep_cut_answers),
                      j.num_replicas, j.num_gpus, j.num_cpus),
        ],
        tables=["train", "quarantine", "filtered"],
        outcomes_key="filtered_samples",
        # The spec's and template's text decide what the teacher reads, not just their file names.
        sample_tables=["train", "filtered"],
        salt=config.generation_key() + ds.spec.sha256 + ds.template_sha256,
        main_table="train",
        manifest_extra={
            "spec": {"name": ds.spec.name, "version": ds.spec.version, "sha256": ds.spec.sha256,
                     "source": ds.spec.source},
            "template": {"source": ds.template_source, "sha256": ds.template_sha256, "text": ds.template},
        },
    )


def distill_models(config: DistillConfig) -> dict:
    return {
        "teacher": config.teacher.model_dump(mode="json", include={"model", "revision", "backend"}),
        "judges": [s.model_dump(mode="json", include={"name", "model", "revision", "reads"}) for s in config.judges],
    }
