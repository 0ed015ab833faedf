"""The README's two Quickstart commands are what CI runs, and the bundled configs validate."""

import re
from pathlib import Path

import pytest

from dafactory.tasks.config import DistillConfig, EvaluateConfig, PreferenceConfig, build_config

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_two_one_line_commands_and_ci_runs_the_test_one():
    demo, test = quickstart_commands()
    assert "dafactory demo" in demo and "pytest" in test
    ci_lines = [l for l in (ROOT / ".ci/run").read_text().splitlines() if l and not l.startswith(("#", "set ", "cd "))]
    assert ci_lines == ["bash .ci/vllm", test]  # the vLLM engine tests in their own venv, then the README's


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name != "deploy.yaml"),
                         ids=lambda p: p.name)
def test_bundled_configs_validate(path):
    cls = {"distill": DistillConfig, "evaluate": EvaluateConfig}.get(path.name.split("-")[0], PreferenceConfig)
    cfg = build_config(cls, path)
    assert cfg.generator.model != "smollm2-135m-instruct"  # real runs name real models
    assert all(s.model for s in cfg.scorer_configs if s.name != "refusal_heuristic")
