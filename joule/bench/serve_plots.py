"""Plots of `joule bench serve` sweeps: latency, goodput and joules per output token against the request rate,
and CDFs of TTFT, TPOT and TBT (each request's largest gap between tokens). Several sweeps (e.g. two schedules) can share one figure, one line each.

An infinite rate (everything sent at once) is drawn to the right of the largest finite rate, labelled ``inf``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from joule.bench.serve_metrics import format_rate
from joule.perf.plots import plot_cdf, pyplot_module, save_figure

if TYPE_CHECKING:
    from joule.bench.serve import SweepReport


def _x_positions(rates: list[float]) -> list[float]:
    finite = [rate for rate in rates if math.isfinite(rate)]
    far = max(finite) * 1.5 if finite else 1.0
    return [rate if math.isfinite(rate) else far for rate in rates]


def _rate_axis(axis, all_rates: list[float]) -> None:
    rates = sorted(set(all_rates))
    axis.set_xticks(_x_positions(rates))
    axis.set_xticklabels([format_rate(rate) for rate in rates])
    axis.set_xlabel("request rate (requests/s)")
    axis.grid(alpha=0.3)


def _lines(axis, sweeps: dict[str, SweepReport], all_rates: list[float], value, label_suffix: str = "",
           marker: str = "o", linestyle: str = "-") -> bool:
    """One line per sweep of ``value(run)`` (None values skipped), one color per sweep in every figure;
    returns whether anything was drawn."""
    positions = dict(zip(sorted(set(all_rates)), _x_positions(sorted(set(all_rates)))))
    drawn = False
    for index, (label, report) in enumerate(sweeps.items()):
        points = [(positions[run.rate], value(run)) for run in report.runs]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            axis.plot(*zip(*sorted(points)), marker=marker, linestyle=linestyle, color=f"C{index}",
                      label=f"{label}{label_suffix}")
            drawn = True
    return drawn


def plot_sweeps(sweeps: dict[str, SweepReport], plot_dir: str | Path, title: str = "") -> list[Path]:
    """Four files in ``plot_dir``: latency_vs_rate, goodput_vs_rate, latency_cdfs, energy_vs_rate (.png)."""
    pyplot = pyplot_module()
    from matplotlib.ticker import NullFormatter

    plot_dir = Path(plot_dir)
    all_rates = [run.rate for report in sweeps.values() for run in report.runs]
    written = []

    figure, axes = pyplot.subplots(1, 2, figsize=(11, 3.8))
    for axis, name in zip(axes, ("ttft_ms", "tpot_ms")):
        _lines(axis, sweeps, all_rates, lambda run, n=name: getattr(run.metrics, n).median, " p50")
        _lines(axis, sweeps, all_rates, lambda run, n=name: getattr(run.metrics, n).percentiles.get("p99"), " p99",
               marker="s", linestyle="--")
        axis.set_ylabel(f"{name.split('_')[0].upper()} (ms)")
        axis.set_yscale("log")
        axis.legend(fontsize=8)
        _rate_axis(axis, all_rates)
    written.append(save_figure(pyplot, figure, plot_dir / "latency_vs_rate.png", title))

    figure, axis = pyplot.subplots(figsize=(6, 3.8))
    _lines(axis, sweeps, all_rates, lambda run: run.metrics.request_throughput, " throughput", linestyle=":")
    _lines(axis, sweeps, all_rates, lambda run: run.metrics.goodput, " goodput", marker="s")
    axis.set_ylabel("requests/s")
    axis.legend(fontsize=8)
    _rate_axis(axis, all_rates)
    written.append(save_figure(pyplot, figure, plot_dir / "goodput_vs_rate.png", title))

    # (request attribute, its SLO attribute, axis label); TBT: a request's largest gap between tokens
    cdfs = (("ttft", "ttft_slo", "TTFT (s)"), ("tpot", "tpot_slo", "TPOT (s)"),
            ("max_itl", "tbt_slo", "TBT: largest gap between tokens (s)"))
    figure, axes = pyplot.subplots(len(sweeps), 3, figsize=(16, 3.4 * len(sweeps)), squeeze=False)
    colors = pyplot.get_cmap("viridis")
    for row, (label, report) in enumerate(sweeps.items()):
        for axis, (name, slo_name, xlabel) in zip(axes[row], cdfs):
            limits = set()
            for index, run in enumerate(report.runs):
                done = [r for r in run.results if r.success and (name == "ttft" or r.output_tokens > 1)
                        and (name != "max_itl" or r.itl)]
                plot_cdf(axis, [getattr(r, name) for r in done], xlabel,
                         line_label=f"{format_rate(run.rate)} req/s",
                         color=colors(0.9 * index / max(len(report.runs) - 1, 1)))
                limits |= {getattr(r, slo_name) for r in run.results} - {None}
            for limit in sorted(limits):
                axis.axvline(limit, color="red", linestyle="--")
            axis.set_xscale("log")
            axis.xaxis.set_minor_formatter(NullFormatter())
            axis.set_title(label, fontsize=10)
    written.append(save_figure(pyplot, figure, plot_dir / "latency_cdfs.png", title))

    figure, axis = pyplot.subplots(figsize=(6, 3.8))
    if not _lines(axis, sweeps, all_rates, lambda run: run.metrics.joules_per_output_token):
        axis.text(0.5, 0.5, "the server reported no energy", ha="center", va="center", transform=axis.transAxes)
    axis.set_ylabel("joules / output token")
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=8)
    _rate_axis(axis, all_rates)
    written.append(save_figure(pyplot, figure, plot_dir / "energy_vs_rate.png", title))
    return written


def plot_report(report: SweepReport, plot_dir: str | Path, title: str = "") -> list[Path]:
    return plot_sweeps({"all": report}, plot_dir, title)
