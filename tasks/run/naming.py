"""Flow run names: the name a user typed (the UI's Run name field, `prefect deployment run --flow-run-name`,
`run_deployment(flow_run_name=...)`) is kept; a name Prefect made up is replaced by `<flow>-<dataset>`.

Prefect names a run it was given no name for with coolname (`smart-snake`), and so does the UI's form
before the user types; that is how a made-up name is told from the user's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path


@functools.cache
def _coolname_words() -> frozenset[str]:
    import coolname

    words = set()
    for path in (Path(coolname.__file__).parent / "data").glob("*.txt"):
        for line in path.read_text().splitlines():
            if line and not line.startswith("#"):
                words.update(line.split())
    return frozenset(words)


def made_up(name: str) -> bool:
    """Whether a run name is one Prefect (or the UI) generated: 2-4 coolname words joined by dashes."""
    parts = name.split("-")
    return 2 <= len(parts) <= 4 and all(p in _coolname_words() for p in parts)


def run_name(flow: str) -> Callable[[], str]:
    """A flow's `flow_run_name`: the run's own name when the user gave one, else `<flow>-<dataset>`."""

    def name() -> str:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        current = ctx.flow_run.name if ctx is not None and ctx.flow_run is not None else None
        if current and not made_up(current):
            return current
        config = (ctx.parameters or {}).get("config") if ctx is not None else None
        if isinstance(config, dict):
            return f"{flow}-{config.get('dataset')}"
        dataset = getattr(config, "dataset", None)
        if config is not None and "dataset" not in config.model_fields_set:  # a partial run: its deployment's
            from dafactory.tasks.run.parameters import deployment_config

            dataset = (deployment_config() or {}).get("dataset", dataset)
        return f"{flow}-{dataset}"

    return name
