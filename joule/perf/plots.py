"""Plots for simulated runs (latency CDFs of one run; goodput/latency/energy against load for a sweep) and the
helpers the serving benchmark's plots share with them (``joule.bench.serve_plots``).

matplotlib is imported lazily (Agg backend) so the simulator itself does not need it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from joule.perf.metrics import SLO, SimulationResult


def pyplot_module():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    from matplotlib import pyplot

    return pyplot


def plot_run(result: SimulationResult, path: str | Path, title: str = "", slo: SLO | None = None) -> Path:
    """CDFs of TTFT, TPOT and e2e latency, with the SLO marked."""
    pyplot = pyplot_module()
    finished = result.finished
    series = {
        "TTFT (s)": ([r.ttft for r in finished], slo.ttft_s if slo else None),
        "TPOT (s)": ([r.tpot for r in finished if r.num_output_tokens > 1], slo.tpot_s if slo else None),
        "end-to-end latency (s)": ([r.e2e for r in finished], None),
    }
    figure, axes = pyplot.subplots(1, 3, figsize=(13, 3.8))
    for axis, (label, (values, limit)) in zip(axes, series.items()):
        plot_cdf(axis, values, label, limit=limit)
    return save_figure(pyplot, figure, path, title)


def plot_cdf(axis, values, xlabel: str, line_label: str | None = None, limit: float | None = None,
             color=None) -> None:
    """Empirical CDF of ``values`` on ``axis``, with an SLO line at ``limit``."""
    data = np.sort(np.asarray(values, dtype=float))
    if data.size:
        axis.plot(data, np.arange(1, data.size + 1) / data.size, label=line_label, color=color)
    if limit is not None:
        axis.axvline(limit, color="red", linestyle="--", label="SLO")
    if limit is not None or line_label is not None:
        axis.legend(fontsize=8)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("fraction of requests")
    axis.grid(alpha=0.3)


def save_figure(pyplot, figure, path: str | Path, title: str = "") -> Path:
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return path


def plot_sweep(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Throughput, goodput, p90 latencies and J/token against the offered request rate."""
    pyplot = pyplot_module()
    rates = [row["offered_rate"] for row in rows]
    figure, axes = pyplot.subplots(1, 3, figsize=(13, 3.8))
    axes[0].plot(rates, [row["request_throughput"] for row in rows], marker="o", label="throughput")
    if "goodput_requests_per_s" in rows[0]:
        axes[0].plot(rates, [row["goodput_requests_per_s"] for row in rows], marker="s", label="goodput")
    axes[0].set_ylabel("requests/s")
    axes[0].legend()
    axes[1].plot(rates, [row["ttft_s"]["p90"] for row in rows], marker="o", label="TTFT p90")
    axes[1].plot(rates, [row["tpot_s"]["p90"] for row in rows], marker="s", label="TPOT p90")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("seconds")
    axes[1].legend()
    axes[2].plot(rates, [row["joules_per_output_token"] for row in rows], marker="o")
    axes[2].set_ylabel("J / output token")
    for axis in axes:
        axis.set_xlabel("offered load (requests/s)")
        axis.grid(alpha=0.3)
    return save_figure(pyplot, figure, path, title)
