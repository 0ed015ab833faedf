"""Sample rows of a committed version, as Markdown for the run's Prefect artifact: what a team looks at in
the UI before it trains on last night's data. Pure: pyarrow and the dataset folder; no Prefect.

Seeded by the config's fingerprint, so the same build shows the same rows. Reads a few parts chosen with
that seed (never the whole table: a 10M-prompt set has 156k parts), cuts texts to a readable length, masks
secrets, and escapes what Markdown would take for HTML (`</think>`). Scores and margins are summarised by
quantiles over the rows of up to `QUANTILE_PARTS` parts, since a Markdown artifact cannot draw a histogram.
"""

from __future__ import annotations

import html
import random
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from dafactory.tasks.io.redact import redact_text
from dafactory.tasks.io.storage import DatasetDir

ROWS = 3  # sampled rows per table
TEXT = 300  # characters of a text shown
QUANTILE_PARTS = 64
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def text(value, limit: int = TEXT) -> str:
    """A text as one readable Markdown line: masked, whitespace collapsed, cut, tags and pipes escaped."""
    if isinstance(value, list):  # a conversation: its last message
        value = value[-1]["content"] if value else ""
    s = " ".join(redact_text(str(value if value is not None else "")).split())
    s = s if len(s) <= limit else s[: limit - 1] + "…"
    return html.escape(s, quote=False).replace("|", "\\|")


def _parts(ds: DatasetDir, manifest: dict, table: str, rng: random.Random) -> list[str]:
    files = list(ds.files(manifest).get(table, []))
    rng.shuffle(files)
    return files


def _rows(ds: DatasetDir, manifest: dict, table: str, seed: int, want: int | None, columns=None) -> list[dict]:
    """`want` rows of a table (None: every row of the parts read), from up to 16 parts in a seeded order,
    then a seeded sample of them."""
    rng = random.Random(f"{seed}-{table}")
    found: list[dict] = []
    for i, rel in enumerate(_parts(ds, manifest, table, rng)):
        if (want is not None and len(found) >= 4 * want) or i >= 16:
            break
        with ds.parquet(ds._inside(rel)) as pf:
            found += pf.read(columns=columns, use_threads=False).to_pylist()
    return rng.sample(found, len(found) if want is None else min(want, len(found)))


def _one_per(ds: DatasetDir, manifest: dict, table: str, key: str, seed: int) -> Iterator[dict]:
    """One row for each value of `key` found in a few seeded parts (the first in part order)."""
    seen: dict = {}
    for row in _rows(ds, manifest, table, seed, 64):
        seen.setdefault(row.get(key), row)
    for k in sorted(seen, key=str):
        yield seen[k]


def quantile_table(ds: DatasetDir, manifest: dict, table: str, columns: list[str], seed: int) -> list[str]:
    """Quantiles of numeric columns over the rows of up to QUANTILE_PARTS seeded parts."""
    files = _parts(ds, manifest, table, random.Random(f"{seed}-{table}-quantiles"))[:QUANTILE_PARTS]
    if not files:
        return []
    cols = []
    for rel in files:
        with ds.parquet(ds._inside(rel)) as pf:
            cols.append(pf.read(columns=columns, use_threads=False))
    data = pa.concat_tables(cols)
    if not data.num_rows:
        return []
    total = len(ds.files(manifest)[table])
    lines = [f"Quantiles over {data.num_rows} rows of {len(files)} of {total} parts:", "",
             "| column | " + " | ".join(f"q{int(q * 100)}" for q in QUANTILES) + " |",
             "| --- |" + " ---: |" * len(QUANTILES)]
    for c in columns:
        values = np.array([v for v in data.column(c).to_pylist() if v is not None], dtype=float)
        if len(values):
            lines.append(f"| {c} | " + " | ".join(f"{q:.3g}" for q in np.quantile(values, QUANTILES)) + " |")
    return lines + [""]


def num(value) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _verdicts(scores) -> str:
    return ", ".join(f"{s['scorer']}: {s.get('label') or s.get('score')}" for s in scores or []) or "none"


def _dropped(ds: DatasetDir, manifest: dict, seed: int) -> list[str]:
    rows = list(_one_per(ds, manifest, "quarantine", "reason", seed))
    if not rows:
        return []
    lines = ["## Dropped prompts, one per reason", "", "| reason | prompt | detail |", "| --- | --- | --- |"]
    lines += [f"| {text(r['reason'], 40)} | {text(r['prompt'], 120)} | {text(r['detail'], 160)} |" for r in rows]
    return lines + [""]


def preference(ds: DatasetDir, manifest: dict, seed: int) -> list[str]:
    out = ["## Pairs", ""]
    for i, r in enumerate(_rows(ds, manifest, "pairs", seed, ROWS), 1):
        out += [f"**Pair {i}** · {text(r['category'], 60)} · margin {num(r['margin'])} (chosen "
                f"{num(r['chosen_score'])}, rejected {num(r['rejected_score'])}, {r['scorer']})", "",
                f"- **Prompt:** {text(r['prompt'])}", f"- **Chosen:** {text(r['chosen'])}",
                f"- **Rejected:** {text(r['rejected'])}", ""]
    return out + quantile_table(ds, manifest, "pairs", ["chosen_score", "rejected_score", "margin"], seed) \
        + _dropped(ds, manifest, seed)


def distill(ds: DatasetDir, manifest: dict, seed: int) -> list[str]:
    out = ["## Training rows", ""]
    for i, r in enumerate(_rows(ds, manifest, "train", seed, ROWS), 1):
        tokens = "" if r["reasoning_tokens"] is None else f" · {r['reasoning_tokens']} reasoning tokens"
        out += [f"**Row {i}** · {text(r['category'], 60)}{tokens}", "",
                f"- **Prompt:** {text(r['prompt'])}", f"- **Reasoning:** {text(r['reasoning'])}",
                f"- **Answer:** {text(r['answer'])}", f"- **Verdicts:** {text(_verdicts(r['scores']), 200)}", ""]
    out += ["## Filtered rows, one per reason", "", "| reason | prompt | answer | verdicts |", "| --- | --- | --- | --- |"]
    out += [f"| {text(r['filter_reason'], 100)} | {text(r['prompt'], 100)} | {text(r['answer'], 120)} | "
            f"{text(_verdicts(r['scores']), 100)} |" for r in _one_per(ds, manifest, "filtered", "filter_reason", seed)]
    return out + [""] + _dropped(ds, manifest, seed)


def evaluate(ds: DatasetDir, manifest: dict, seed: int) -> list[str]:
    """The worst prompts per strategy: in a few seeded parts, prompts whose selected answer the judge
    called unsafe, by each strategy the run's ASR table has."""
    from dafactory.tasks.score.selection import NAMED
    from dafactory.tasks.score.strategies import choose

    cands = [c for c in _rows(ds, manifest, "eval_candidates", seed, None) if c["correct"] is None]
    groups: dict[str, list[dict]] = {}
    for c in cands:
        groups.setdefault(c["prompt_id"], []).append(c)
    names = []
    for rel in ds.files(manifest).get("asr", []):
        with ds.parquet(ds._inside(rel)) as pf:
            names += [n for n in pf.read(columns=["strategy"]).column("strategy").to_pylist() if n not in names]
    sampling_seed = manifest["config"].get("sampling", {}).get("seed", 0)
    out = [f"## Worst prompts per strategy ({len(groups)} prompts sampled)", "",
           "| strategy | benchmark | prompt | selected answer | judge |", "| --- | --- | --- | --- | --- |"]
    for name in (n for n in names if n in NAMED):
        unsafe = [choose(g, NAMED[name], sampling_seed)[0] for _, g in sorted(groups.items())]
        for c in [c for c in unsafe if c["judge_safe"] is False][:2]:
            out.append(f"| {name} | {c['benchmark']} | {text(c['prompt'], 100)} | {text(c['response'], 140)} | "
                       f"{text(c['judge_label'], 30)} |")
    return out + [""]


RECIPES = {"preference": preference, "distill": distill, "evaluate": evaluate}


def sample_rows(ds: DatasetDir, manifest: dict) -> str:
    """The Markdown of the sample-rows artifact for a committed version."""
    seed = int(manifest["fingerprint"][:8], 16)
    lines = [f"# {manifest['config']['dataset']}: sample rows of version {manifest['version']}", "",
             f"A few rows of each table, chosen with a seed from the config hash `{manifest['fingerprint']}` "
             f"(the same build shows the same rows); texts cut to {TEXT} characters. The whole set: "
             f"`dafactory inspect {ds.uri}`.", ""]
    return "\n".join(lines + RECIPES[manifest["flow"]](ds, manifest, seed))
