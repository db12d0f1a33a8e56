"""One figure for a validation (``joule perf validate --plot``): every step predicted against measured, and each whole
run's errors against the issue's targets, since a scatter shows where a model is wrong faster than a table."""

from __future__ import annotations

import statistics
from pathlib import Path

from joule.perf.plots import pyplot_module, save_figure

STEP_TARGET = 0.10  # median |error| of step latency
RUN_TARGETS = {"output_throughput": 0.10, "ttft_s_p50": 0.15, "tpot_s_p50": 0.15, "energy_j": 0.10}
LABELS = {"output_throughput": "throughput", "ttft_s_p50": "TTFT p50", "tpot_s_p50": "TPOT p50", "energy_j": "energy"}
KIND_COLORS = {"prefill": "tab:blue", "decode": "tab:orange", "mixed": "tab:green"}


def plot_validation(step_checks: dict, runs: dict, path: str | Path, title: str = "") -> Path:
    """``step_checks``: section name ("steps", "offline", "serving") -> StepChecks; ``runs``: "offline"/"serving" ->
    a comparison as ``compare_run`` or ``resimulate`` returns it (each metric with its "error")."""
    pyplot = pyplot_module()
    sections = [name for name, checks in step_checks.items() if checks]
    figure, axes = pyplot.subplots(1, len(sections) + 1, figsize=(4.6 * (len(sections) + 1), 4.2), squeeze=False)
    for axis, name in zip(axes[0], sections):
        _scatter(axis, name, step_checks[name])
    _run_errors(axes[0][-1], runs)
    return save_figure(pyplot, figure, path, title)


def _scatter(axis, name: str, checks) -> None:
    from matplotlib.ticker import NullFormatter  # matplotlib is loaded by pyplot_module() first

    measured = [check.measured_s * 1e3 for check in checks]
    predicted = [check.predicted_s * 1e3 for check in checks]
    for kind, color in KIND_COLORS.items():
        points = [(m, p) for m, p, check in zip(measured, predicted, checks) if check.kind == kind]
        if points:
            axis.scatter(*zip(*points), s=10, alpha=0.6, color=color, label=f"{kind} ({len(points)})")
    low, high = min(measured + predicted), max(measured + predicted)
    line = [low, high]
    axis.plot(line, line, color="black", linewidth=0.8)
    for factor in (1 - STEP_TARGET, 1 + STEP_TARGET):
        axis.plot(line, [value * factor for value in line], color="grey", linestyle="--", linewidth=0.6)
    median = statistics.median(abs(check.error) for check in checks)
    axis.set_xscale("log")
    axis.set_yscale("log")
    for scale in (axis.xaxis, axis.yaxis):  # labelled decades only: minor labels overlap on narrow ranges
        scale.set_minor_formatter(NullFormatter())
    axis.set_xlabel("measured step (ms)")
    axis.set_ylabel("predicted step (ms)")
    axis.set_title(f"{name}: median |error| {median:.1%}", fontsize=10)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3, which="both")


def _run_errors(axis, runs: dict) -> None:
    names = [name for name in ("offline", "serving") if runs.get(name)]
    metrics = [key for key in RUN_TARGETS if any(key in runs[name] for name in names)]
    width = 0.8 / max(1, len(names))
    for index, name in enumerate(names):
        values = [runs[name][key]["error"] * 100 if key in runs[name] else 0.0 for key in metrics]
        positions = [position + (index - (len(names) - 1) / 2) * width for position in range(len(metrics))]
        axis.bar(positions, values, width=width, label=name)
    for position, key in enumerate(metrics):
        target = RUN_TARGETS[key] * 100
        axis.plot([position - 0.45, position + 0.45], [target, target], color="red", linestyle="--", linewidth=0.8)
        axis.plot([position - 0.45, position + 0.45], [-target, -target], color="red", linestyle="--", linewidth=0.8)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks(range(len(metrics)), [LABELS[key] for key in metrics], fontsize=9)
    axis.set_ylabel("simulated vs measured (%)")
    axis.set_title("whole runs (red: targets)", fontsize=10)
    if names:
        axis.legend(fontsize=8)
    axis.grid(alpha=0.3, axis="y")
