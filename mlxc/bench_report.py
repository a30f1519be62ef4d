"""Figures from `mlxc bench` samples: per-scenario statistics (mean, median, p95, p99 of
TTFT, ITL, TPOT and E2E, in milliseconds), speedups, a Rich table, JSON, and a PNG of the
latency distributions on a log scale."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.table import Table

from mlxc.bench import Result

METRICS = (("ttft", "TTFT"), ("itl", "ITL"), ("tpot", "TPOT"), ("e2e", "E2E"))
STATS = ("mean", "median", "p95", "p99")
COLOURS = {"miss": "tab:red", "hit": "tab:green", "follow-up": "tab:blue",
           "concurrent": "tab:orange", "reference": "tab:gray"}


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), for q in [0, 100]."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def stats_ms(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ms = [v * 1000 for v in values]
    return {"mean": sum(ms) / len(ms), "median": percentile(ms, 50),
            "p95": percentile(ms, 95), "p99": percentile(ms, 99)}


def summarize(result: Result) -> dict[str, Any]:
    scenarios = {}
    for name, samples in result.samples.items():
        wall = result.walls.get(name, 0.0)
        output = sum(s.completion_tokens for s in samples)
        prompt = sum(s.prompt_tokens for s in samples)
        reused = sum(s.cached_tokens for s in samples)
        scenarios[name] = {
            "requests": len(samples),
            "cache": dict(Counter(s.status for s in samples)),
            "ttft_ms": stats_ms([s.ttft for s in samples]),
            "itl_ms": stats_ms([gap for s in samples for gap in s.itl]),
            "tpot_ms": stats_ms([s.tpot for s in samples if s.tpot is not None]),
            "e2e_ms": stats_ms([s.e2e for s in samples]),
            "prompt_tokens": prompt,
            "cached_tokens": reused,
            "prompt_reused_fraction": reused / prompt if prompt else 0.0,
            "output_tokens": output,
            "wall_seconds": wall,
            "tokens_per_second": output / wall if wall > 0 else 0.0,
        }
    return {
        "scenarios": scenarios,
        "speedup": _speedups(scenarios),
        "identical": {k: {"same": a, "compared": b} for k, (a, b) in result.identical.items()},
    }


def _ratio(scenarios: dict, slow: str, fast: str, metric: str) -> float | None:
    a, b = scenarios.get(slow, {}).get(metric), scenarios.get(fast, {}).get(metric)
    return a["median"] / b["median"] if a and b and b["median"] > 0 else None


def _speedups(scenarios: dict) -> dict[str, float | None]:
    return {
        "hit_vs_miss_e2e": _ratio(scenarios, "miss", "hit", "e2e_ms"),
        "hit_vs_miss_ttft": _ratio(scenarios, "miss", "hit", "ttft_ms"),
        # the same follow-up prompts, without and with the prefix cache
        "follow_up_ttft_prefix": _ratio(scenarios, "reference", "follow-up", "ttft_ms"),
    }


def as_json(meta: dict[str, Any], result: Result) -> dict[str, Any]:
    """Everything: settings, summary, and every sample (seconds, as measured)."""
    samples = {k: [asdict(s) for s in v] for k, v in result.samples.items()}
    return {**meta, **summarize(result), "samples": samples}


def servers_line(result: Result) -> str:
    """How the requests spread over several servers: 'url: n requests (h hits), ...'."""
    counts: dict[str, list[int]] = {}
    for samples in result.samples.values():
        for sample in samples:
            figures = counts.setdefault(sample.server, [0, 0])
            figures[0] += 1
            figures[1] += sample.status == "hit"
    return "servers: " + ", ".join(f"{server} {n} requests ({hits} hits)"
                                   for server, (n, hits) in sorted(counts.items()))


def _ms(value: float) -> str:
    if value < 0.01:
        return "<0.01"  # a replayed hit: its pieces come back to back
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _duration(ms: float) -> str:
    return f"{ms / 1000:.2f} s" if ms >= 1000 else f"{_ms(ms)} ms"


def table(summary: dict[str, Any], title: str) -> Table:
    table = Table(title=title, title_justify="left", caption_justify="left")
    for header in ("scenario", "n", "tok/s", "reused", "ms"):
        table.add_column(header, justify="left" if header in ("scenario", "ms") else "right")
    for name in STATS:
        table.add_column(name, justify="right")
    for name, figures in summary["scenarios"].items():
        first = True
        for key, label in METRICS:
            values = figures[f"{key}_ms"]
            lead = [name, str(figures["requests"]), f"{figures['tokens_per_second']:.1f}",
                    f"{figures['prompt_reused_fraction']:.0%}"] if first else ["", "", "", ""]
            cells = [_ms(values[s]) for s in STATS] if values else ["-"] * len(STATS)
            table.add_row(*lead, label, *cells, end_section=key == "e2e")
            first = False
    table.caption = "\n".join(_findings(summary))
    return table


def _findings(summary: dict[str, Any]) -> list[str]:
    lines, speed, sc = [], summary["speedup"], summary["scenarios"]
    if speed["hit_vs_miss_e2e"]:
        lines.append(
            f"hit vs miss: E2E ×{speed['hit_vs_miss_e2e']:.0f} faster (median "
            f"{_duration(sc['miss']['e2e_ms']['median'])} → "
            f"{_duration(sc['hit']['e2e_ms']['median'])}), "
            f"TTFT ×{speed['hit_vs_miss_ttft']:.0f}"
        )
    if "follow-up" in sc:
        line = f"follow-up: {sc['follow-up']['prompt_reused_fraction']:.0%} of prompt tokens reused"
        if speed["follow_up_ttft_prefix"]:
            line += (f"; TTFT ×{speed['follow_up_ttft_prefix']:.1f} faster than without the "
                     "prefix cache")
        lines.append(line)
    levels = {n: f for n, f in sc.items() if n.startswith("concurrent ")}
    if levels:
        one = next(iter(levels.values()))["tokens_per_second"]
        lines.append("aggregate tokens/s by clients at once: " + " · ".join(
            f"{n.split()[1]} → {f['tokens_per_second']:.1f}"
            + (f" (×{f['tokens_per_second'] / one:.1f})" if one else "")
            for n, f in levels.items()))
    same = summary["identical"]
    if same:
        lines.append("identical greedy outputs: " + " · ".join(
            f"{k} {v['same']}/{v['compared']}" for k, v in same.items()))
    return lines


def plot(result: Result, path: Path, title: str) -> None:
    """Per-scenario TTFT and E2E, each request a dot over a box, on a log axis."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and none wanted
    import matplotlib.pyplot as plt

    names = [n for n in result.samples if result.samples[n]]
    fig, axes = plt.subplots(1, 2, figsize=(11, 1.2 + 0.7 * len(names)), sharey=True)
    panels = (("ttft", "time to first token"), ("e2e", "end to end"))
    for ax, (key, label) in zip(axes, panels, strict=True):
        data = [[max(getattr(s, key) * 1000, 1e-3) for s in result.samples[n]] for n in names]
        ax.boxplot(data, vert=False, widths=0.5, showfliers=False)
        for i, (name, values) in enumerate(zip(names, data, strict=True), 1):
            jitter = [i + 0.15 * math.sin(j * 2.4) for j in range(len(values))]
            colour = COLOURS.get(name.split()[0], "tab:purple")
            ax.scatter(values, jitter, s=14, alpha=0.75, color=colour)
        ax.set_xscale("log")
        ax.set_xlabel(f"{label} (ms, log scale)")
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[0].set_yticks(range(1, len(names) + 1), names)
    axes[0].invert_yaxis()  # scenarios top-down in the order they ran
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
