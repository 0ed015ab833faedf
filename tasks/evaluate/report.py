"""The evaluation report: Markdown and PNG plots from ASR rows. No Prefect, Ray or torch."""

from __future__ import annotations

import io
from collections import defaultdict


def _fmt(v, pct=False) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:+.1f}%" if pct else f"{v:.1f}"


def markdown(title: str, facts: dict, asr_rows: list[dict], layer_rows: list[dict], mean_drops: dict,
             warnings: list[str], utility_rows: list[dict] = ()) -> str:
    benches = sorted({r["benchmark"] for r in asr_rows})
    strategies = list(dict.fromkeys(r["strategy"] for r in asr_rows))
    cell = {(r["strategy"], r["benchmark"]): r for r in asr_rows}
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in facts.items()]
    lines.append("")
    for w in warnings:
        lines += [f"> **Warning:** {w}", ""]
    lines += ["## ASR by strategy (%, lower is safer; relative drop against first sample in brackets)", ""]
    lines.append("| strategy | " + " | ".join(benches) + " | mean drop |")
    lines.append("|---" * (len(benches) + 2) + "|")
    for st in strategies:
        cells = []
        for b in benches:
            r = cell.get((st, b))
            cells.append("" if r is None else f"{_fmt(r['asr'])} ({_fmt(r['drop_vs_first'], pct=True)})")
        lines.append(f"| {st} | " + " | ".join(cells) + f" | {_fmt(mean_drops.get(st), pct=True)} |")
    lines += ["", "![ASR by strategy](asr_by_strategy.png)", ""]
    if layer_rows:
        lines += ["## ASR of the latent rule by layer (%)", "", "![ASR by layer](asr_by_layer.png)", ""]
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
    values = {(r["strategy"], r["benchmark"]): r["asr"] for r in asr_rows}
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(strategies)), 3.6))
    width = 0.8 / max(1, len(benches))
    for j, b in enumerate(benches):
        xs = [i + j * width for i in range(len(strategies))]
        ax.bar(xs, [values.get((s, b)) or 0 for s in strategies], width, label=b)
    ax.set_xticks([i + width * (len(benches) - 1) / 2 for i in range(len(strategies))])
    ax.set_xticklabels(strategies, rotation=30, ha="right")
    ax.set_ylabel("ASR (%)")
    ax.set_title("Attack success rate by selection strategy")
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
        layer = int(r["strategy"].rsplit("@", 1)[1])
        series[r["benchmark"]].append((layer, r["asr"]))
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for b, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] if p[1] is not None else float("nan") for p in pts], marker="o", label=b)
    ax.set_xlabel("layer")
    ax.set_ylabel("ASR (%)")
    ax.set_title("Latent rule (argmin cosine) by layer")
    ax.legend()
    data = _png(fig)
    plt.close(fig)
    return data
