"""The evaluation report: Markdown and PNG plots from ASR rows and their intervals. No Prefect, Ray or torch."""

from __future__ import annotations

import io
from collections import defaultdict


def _fmt(v, pct=False) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:+.1f}%" if pct else f"{v:.1f}"


def _with_ci(v, low, high, pct=False) -> str:
    """`12.5 [8.1, 17.0]`: a value and its interval (the value alone where there is none)."""
    if v is None or low is None or high is None:
        return _fmt(v, pct)
    return f"{_fmt(v, pct)} [{_fmt(low, pct)}, {_fmt(high, pct)}]"


def _p(p) -> str:
    return "n/a" if p is None else f"{p:.3g}"


def _asr_grid(rows: list[dict], mean_drops: dict | None = None) -> list[str]:
    """Strategies down, benchmarks across: ASR with its interval (and the mean drop when given)."""
    benches = sorted({r["benchmark"] for r in rows})
    cell = {(r["strategy"], r["benchmark"]): r for r in rows}
    extra = [] if mean_drops is None else ["mean drop"]
    lines = ["| strategy | " + " | ".join(benches + extra) + " |", "|---" * (len(benches) + len(extra) + 1) + "|"]
    for st in dict.fromkeys(r["strategy"] for r in rows):
        cells = []
        for b in benches:
            r = cell.get((st, b))
            cells.append("" if r is None else _with_ci(r["asr"], r.get("asr_ci_low"), r.get("asr_ci_high")))
        if mean_drops is not None:
            cells.append(_fmt(mean_drops.get(st), pct=True))
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    return lines


def _against_first(rows: list[dict]) -> list[str]:
    """One line per (benchmark, strategy) other than first-sample: the relative drop with its interval,
    the discordant counts and the exact McNemar p-value."""
    lines = ["| benchmark | strategy | relative drop [CI] | b | c | McNemar p |", "|---" * 6 + "|"]
    skipped = {}  # per benchmark: the count depends only on first-sample's outcomes and the seed
    for r in sorted(rows, key=lambda r: r["benchmark"]):
        if r["strategy"] == "first_sample":
            continue
        drop = _with_ci(r["drop_vs_first"], r.get("drop_ci_low"), r.get("drop_ci_high"), pct=True)
        b, c = ("n/a" if r.get(k) is None else r[k] for k in ("mcnemar_b", "mcnemar_c"))
        lines.append(f"| {r['benchmark']} | {r['strategy']} | {drop} | {b} | {c} | {_p(r.get('mcnemar_p'))} |")
        if r.get("drop_ci_skipped") and r.get("drop_ci_low") is not None:
            skipped[r["benchmark"]] = max(skipped.get(r["benchmark"], 0), r["drop_ci_skipped"])
    lines += ["", "b: prompts unsafe under first sample and safe under the strategy; c: the reverse. A small p says "
              "the two rules differ on these prompts beyond chance."]
    if skipped:
        lines.append("The drop is undefined where a resample's first-sample ASR is 0; its interval leaves those "
                     "resamples out (" + ", ".join(f"{b}: {n}" for b, n in skipped.items()) + ").")
    return lines


def markdown(title: str, facts: dict, asr_rows: list[dict], layer_rows: list[dict], mean_drops: dict,
             warnings: list[str], utility_rows: list[dict] = ()) -> str:
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in facts.items()]
    lines.append("")
    for w in warnings:
        lines += [f"> **Warning:** {w}", ""]
    lines += ["## ASR by strategy (%, lower is safer; confidence interval in brackets)", ""]
    lines += _asr_grid(asr_rows, mean_drops)
    lines += ["", "![ASR by strategy](asr_by_strategy.png)", ""]
    if any(r["strategy"] != "first_sample" for r in asr_rows):
        lines += ["## Against first sample (relative drop of ASR; exact McNemar test on the same prompts)", ""]
        lines += _against_first(asr_rows) + [""]
    if layer_rows:
        lines += ["## ASR of the latent rule by layer (%)", ""]
        lines += _asr_grid(layer_rows) + ["", "![ASR by layer](asr_by_layer.png)", ""]
    if utility_rows:
        ubench = sorted({r["benchmark"] for r in utility_rows})
        ucell = {(r["strategy"], r["benchmark"]): r for r in utility_rows}
        lines += ["## Utility: accuracy by strategy (%, utility cost against first sample in brackets)", ""]
        lines.append("| strategy | " + " | ".join(ubench) + " |")
        lines.append("|---" * (len(ubench) + 1) + "|")
        for st in dict.fromkeys(r["strategy"] for r in utility_rows):
            cells = [f"{_fmt(ucell[(st, b)]['accuracy'])} ({_fmt(ucell[(st, b)]['drop_vs_first'], pct=True)})"
                     for b in ubench if (st, b) in ucell]
            lines.append(f"| {st} | " + " | ".join(cells) + " |")
        lines.append("")
    prompts = {r["benchmark"]: r["prompts"] for r in list(asr_rows) + list(utility_rows)}
    lines += ["Prompts per benchmark: " + ", ".join(f"{b} {n}" for b, n in sorted(prompts.items())), ""]
    return "\n".join(lines)


def _error_bars(rows: list[dict]) -> tuple[list[float], list[float]]:
    """Lower and upper error-bar lengths from the ASR intervals (NaN, drawn as nothing, where there is none)."""
    low, high = [], []
    for r in rows:
        v, lo, hi = (None if r is None else r.get(k) for k in ("asr", "asr_ci_low", "asr_ci_high"))
        missing = v is None or lo is None or hi is None
        low.append(float("nan") if missing else max(0.0, v - lo))
        high.append(float("nan") if missing else max(0.0, hi - v))
    return low, high


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def plot_asr_by_strategy(asr_rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    benches = sorted({r["benchmark"] for r in asr_rows})
    strategies = list(dict.fromkeys(r["strategy"] for r in asr_rows))
    cell = {(r["strategy"], r["benchmark"]): r for r in asr_rows}
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(strategies)), 3.6))
    width = 0.8 / max(1, len(benches))
    for j, b in enumerate(benches):
        xs = [i + j * width for i in range(len(strategies))]
        rows = [cell.get((s, b)) for s in strategies]
        ax.bar(xs, [(r or {}).get("asr") or 0 for r in rows], width, label=b, yerr=_error_bars(rows), capsize=3)
    ax.set_xticks([i + width * (len(benches) - 1) / 2 for i in range(len(strategies))])
    ax.set_xticklabels(strategies, rotation=30, ha="right")
    ax.set_ylabel("ASR (%)")
    ax.set_title("Attack success rate by selection strategy (error bars: confidence interval)")
    ax.legend()
    data = _png(fig)
    plt.close(fig)
    return data


def plot_asr_by_layer(layer_rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(list)
    for r in layer_rows:
        series[r["benchmark"]].append((int(r["strategy"].rsplit("@", 1)[1]), r))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for b, pts in sorted(series.items()):
        pts.sort(key=lambda p: p[0])
        rows = [p[1] for p in pts]
        ax.errorbar([p[0] for p in pts], [r["asr"] if r["asr"] is not None else float("nan") for r in rows],
                    yerr=_error_bars(rows), marker="o", capsize=3, label=b)
    ax.set_xlabel("layer")
    ax.set_ylabel("ASR (%)")
    ax.set_title("Latent rule (argmin cosine) by layer (error bars: confidence interval)")
    ax.legend()
    data = _png(fig)
    plt.close(fig)
    return data
