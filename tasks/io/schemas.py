"""Every output table's schema, defined once. Writers cast to these; readers can rely on them.

Row contracts: a unit that reads a table names the columns it needs with `require_columns`.
"""

from __future__ import annotations

import pyarrow as pa

from dafactory.tasks.errors import UserError

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)

DETAIL = pa.struct([("name", pa.string()), ("value", pa.float64())])

SCORE = pa.struct(
    [
        ("scorer", pa.string()),
        ("view", pa.string()),  # what the scorer read: "response", or "full"/"answer"/"reasoning"
        ("score", pa.float64()),  # null when the scorer could not score (reason says why)
        ("label", pa.string()),
        ("reason", pa.string()),
        ("heuristic", pa.bool_()),  # true for rule-based scorers such as refusal_heuristic
        ("details", pa.list_(DETAIL)),  # sub-scores of rubric judges
    ]
)

# What the generation stage hands on: one row per (prompt_id, sample_idx).
GENERATED = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("sample_idx", pa.int32()),
        ("prompt", pa.string()),
        ("category", pa.string()),
        ("response", pa.string()),
        ("finish_reason", pa.string()),  # "stop" or "length"
        ("prompt_tokens", pa.int32()),
        ("response_tokens", pa.int32()),
        # The generator's own token ids of `response` (special tokens it emitted included, EOS not)
        ("response_token_ids", pa.list_(pa.int32())),
        # Budget forcing (sampling.reasoning_budget): the reasoning was closed for the model; the tokens before
        # the close and after it (null when budget forcing was off)
        ("reasoning_forced_close", pa.bool_()),
        ("reasoning_tokens", pa.int32()),
        ("answer_tokens", pa.int32()),
        ("model", pa.string()),
        ("model_revision", pa.string()),
        ("seed", pa.int64()),
        ("shard_id", pa.string()),
    ]
)

CANDIDATES = pa.schema(
    list(GENERATED)
    + [
        ("scores", pa.list_(SCORE)),
        ("selection_score", pa.float64()),  # the selection scorer's value, null if invalid
        ("is_best", pa.bool_()),
        ("pair_role", pa.string()),  # "chosen", "rejected" or null
    ]
)

# TRL conversational preference format plus provenance.
PAIRS = pa.schema(
    [
        ("prompt", MESSAGES),
        ("chosen", MESSAGES),
        ("rejected", MESSAGES),
        ("prompt_id", pa.string()),
        ("category", pa.string()),
        ("chosen_sample_idx", pa.int32()),
        ("rejected_sample_idx", pa.int32()),
        ("chosen_score", pa.float64()),
        ("rejected_score", pa.float64()),
        ("margin", pa.float64()),
        ("scorer", pa.string()),
    ]
)

# TRL conversational prompt-completion format plus provenance.
BEST = pa.schema(
    [
        ("prompt", MESSAGES),
        ("completion", MESSAGES),
        ("prompt_id", pa.string()),
        ("category", pa.string()),
        ("sample_idx", pa.int32()),
        ("score", pa.float64()),
        ("scorer", pa.string()),
    ]
)

# The planned input: every unique prompt that went to a shard (read back by the shard's worker, and by
# `dafactory verify` to account for every source row).
PROMPTS = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("source_row", pa.int64()),
        ("prompt", pa.string()),
        ("category", pa.string()),
        ("categories", pa.list_(pa.string())),
        ("reference", pa.string()),  # utility benchmarks: JSON [kind, answer, number of choices]
        ("max_new_tokens", pa.int64()),  # the row's own bound on new tokens (max_new_tokens_column); null: the config's
        ("shard_id", pa.string()),
    ]
)

# Input rows that never reached a model, with the reason.
QUARANTINE = pa.schema(
    [
        ("prompt_id", pa.string()),  # null when the text could not be decoded
        ("source_row", pa.int64()),
        ("prompt", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)

# Distilled samples: `train` (kept) and `filtered` (excluded, with filter_reason) share this schema.
# prompt/completion are TRL's conversational prompt-completion format, with the spec removed.
DISTILLED = pa.schema(
    [
        ("prompt", MESSAGES),
        ("completion", MESSAGES),  # one assistant message: <think>reasoning</think>answer
        ("prompt_id", pa.string()),
        ("category", pa.string()),
        ("sample_idx", pa.int32()),
        ("teacher", pa.string()),
        ("teacher_revision", pa.string()),
        ("seed", pa.int64()),
        ("response", pa.string()),  # the teacher's raw output after the opened <think>
        ("reasoning", pa.string()),
        ("answer", pa.string()),
        ("parse_status", pa.string()),  # ok, truncated, missing_think_close, empty_answer
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("response_tokens", pa.int32()),
        ("reasoning_forced_close", pa.bool_()),  # budget forcing closed the reasoning (see GENERATED)
        ("reasoning_tokens", pa.int32()),
        ("answer_tokens", pa.int32()),
        ("scores", pa.list_(SCORE)),  # every judge verdict, one per judge and view
        ("filter_reason", pa.string()),  # null in train
    ]
)

# Evaluation: every candidate with every signal and the judge's verdict (judged once, shared by all strategies).
EVAL_CANDIDATES = pa.schema(
    list(GENERATED)
    + [
        ("benchmark", pa.string()),
        ("scores", pa.list_(SCORE)),
        ("judge_safe", pa.bool_()),  # false when the judge said unsafe or gave no verdict; null on utility sets
        ("judge_label", pa.string()),
        ("judge_reason", pa.string()),
        ("correct", pa.bool_()),  # utility sets: the answer matches the reference; null on safety sets
    ]
)

# Accuracy per (utility benchmark, strategy): the utility cost of a selection rule.
UTILITY = pa.schema(
    [
        ("benchmark", pa.string()),
        ("strategy", pa.string()),
        ("prompts", pa.int64()),
        ("correct", pa.int64()),
        ("accuracy", pa.float64()),  # percent
        ("drop_vs_first", pa.float64()),  # (acc_first - acc) / acc_first: the utility cost; null if acc_first is 0
        ("fallbacks", pa.int64()),
        ("note", pa.string()),
    ]
)

# ASR per (benchmark, strategy), the shape of the paper's Table 1.
ASR = pa.schema(
    [
        ("benchmark", pa.string()),
        ("strategy", pa.string()),
        ("prompts", pa.int64()),
        ("unsafe", pa.int64()),
        ("asr", pa.float64()),  # percent
        ("drop_vs_first", pa.float64()),  # (ASR_first - ASR) / ASR_first; null when ASR_first is 0
        ("fallbacks", pa.int64()),  # prompts where the strategy had no valid signal and took sample 0
        ("note", pa.string()),
        # Uncertainty (tasks/evaluate/stats.py): percentile intervals of a paired bootstrap over prompts (the
        # strategy and first-sample resampled together), at the run's `confidence`; null where undefined.
        ("asr_ci_low", pa.float64()),  # percent
        ("asr_ci_high", pa.float64()),
        ("drop_ci_low", pa.float64()),  # relative drop, as drop_vs_first
        ("drop_ci_high", pa.float64()),
        ("drop_ci_skipped", pa.int64()),  # resamples left out of the drop's interval: first-sample ASR 0 in them
        # Exact McNemar test against first-sample on the same prompts: b = prompts unsafe under first-sample
        # and safe under the strategy, c = the reverse; p = min(1, 2 * BinomCDF(min(b, c); b + c, 1/2)).
        ("mcnemar_b", pa.int64()),
        ("mcnemar_c", pa.int64()),
        ("mcnemar_p", pa.float64()),
    ]
)

TABLES: dict[str, pa.Schema] = {
    "prompts": PROMPTS,
    "candidates": CANDIDATES,
    "pairs": PAIRS,
    "best": BEST,
    "quarantine": QUARANTINE,
    "train": DISTILLED,
    "filtered": DISTILLED,
    "eval_candidates": EVAL_CANDIDATES,
    "asr": ASR,
    "asr_by_layer": ASR,
    "utility": UTILITY,
}


def conform(table: pa.Table, name: str) -> pa.Table:
    """A part of table `name` with the columns its schema gained after the part was written (all nullable) added
    as nulls, in the schema's order: a dataset folder outlives a release, and its old parts are read, resumed and
    compacted beside new ones."""
    schema = TABLES.get(name)
    if schema is None or set(schema.names) <= set(table.schema.names):
        return table
    for field in schema:
        if field.name not in table.schema.names:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names + [n for n in table.schema.names if n not in schema.names])


def require_columns(available: list[str], needed: list[str], what: str) -> None:
    missing = [c for c in needed if c not in available]
    if missing:
        raise UserError(
            f"{what}: missing column(s) {', '.join(map(repr, missing))}; "
            f"columns present: {', '.join(map(repr, available)) or '(none)'}"
        )


def to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Build a table with exactly `schema` (extra keys are a bug, so they fail loudly)."""
    if rows:
        extra = set(rows[0]) - set(schema.names)
        if extra:
            raise ValueError(f"rows carry columns outside the schema: {sorted(extra)}")
    return pa.Table.from_pylist(rows, schema=schema)
