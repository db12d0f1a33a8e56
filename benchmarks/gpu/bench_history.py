"""Issue 3's four workloads over every saved engine bench of one GPU kind: a table and a plot against the targets.

Usage (repo root, no GPU needed): python benchmarks/gpu/bench_history.py [--kind h100] [--plot FILE.png]

Why: a single bench says little where the machines of one kind differ 2x in host speed between starts and the
transformers peer of workload 3 moved 1,024-1,363 tok/s between calls (docs/benchmarks.md). Every call's
``engine_bench.py`` JSON is kept under ``benchmarks/gpu/<kind>_<date><session>/``; this reads them all (plain or
gzipped, a session folder's own file as its first call, ``callN/`` folders and ``engine_bench_callN`` files after),
so the spread and the median of each target show at a glance.
"""

from __future__ import annotations

import argparse
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from joule.perf.json_files import read_json

GPU_RESULTS = Path(__file__).resolve().parent
TARGETS = {"batch1_roofline": 0.80, "workload2_tok_s": 20_000.0, "workload3_ratio": 30.0}


@dataclass(frozen=True)
class BenchRun:
    label: str  # session folder and call, e.g. "2026-12-06l call5"
    batch1_roofline: float | None  # the unmetered lookahead greedy row's fraction of the roofline
    workload2_tok_s: float | None
    workload3_tok_s: float | None
    peer_tok_s: float | None  # transformers generate_batch, the faster of its runs

    @property
    def workload3_ratio(self) -> float | None:
        if self.workload3_tok_s is None or not self.peer_tok_s:
            return None
        return self.workload3_tok_s / self.peer_tok_s


def _call_number(path: Path, session: Path) -> int:
    """0 for the session folder's own file, else the N of ``callN/`` or ``engine_bench_callN``."""
    found = re.search(r"call(\d+)", str(path.relative_to(session)))
    return int(found.group(1)) if found else 0


def read_run(path: Path, label: str) -> BenchRun:
    data = read_json(path)
    greedy_lookahead = [row for row in data.get("b", [])
                        if row.get("model", "").endswith("unmetered lookahead") and not row.get("temperature")]
    peer = data.get("d_generate_batch", {})
    return BenchRun(
        label=label,
        batch1_roofline=greedy_lookahead[0].get("roofline_fraction") if greedy_lookahead else None,
        workload2_tok_s=data.get("(c) qwen3-0.6b", {}).get("output_tok_per_s"),
        workload3_tok_s=data.get("d", {}).get("output_tok_per_s"),
        peer_tok_s=max(peer.get("runs_tok_per_s") or [peer.get("output_tok_per_s") or 0.0]) or None,
    )


def collect_runs(root: Path, kind: str) -> list[BenchRun]:
    """Every engine bench of ``kind`` under ``root``, in session order, then call order."""
    runs = []
    for session in sorted(root.glob(f"{kind}_*")):
        if not session.is_dir():
            continue
        paths = [path for path in session.rglob("engine_bench*.json*") if path.suffix in (".json", ".gz")]
        for path in sorted(paths, key=lambda path: (_call_number(path, session), str(path))):
            runs.append(read_run(path, f"{session.name.split('_', 1)[1]} {_call_name(path, session)}"))
    return runs


def _call_name(path: Path, session: Path) -> str:
    """``callN`` from the folder or file name, with what else the file name says (``call1_before_fix``,
    ``early_exit``); the session folder's own ``engine_bench.json`` is ``call1``."""
    relative = str(path.relative_to(session)).replace("/", " ")
    name = re.sub(r"\.json(\.gz)?$", "", relative).replace("engine_bench", "").strip(" _")
    return name or "call1"


def summary_lines(runs: list[BenchRun]) -> list[str]:
    lines = [f"{'bench':<30} {'batch 1':>8} {'workload 2':>11} {'workload 3':>11} {'peer':>7} {'ratio':>7}"]
    for run in runs:
        lines.append(f"{run.label:<30} {_text(run.batch1_roofline, '{:.1%}'):>8} {_text(run.workload2_tok_s, '{:,.0f}'):>11} "
                     f"{_text(run.workload3_tok_s, '{:,.0f}'):>11} {_text(run.peer_tok_s, '{:,.0f}'):>7} "
                     f"{_text(run.workload3_ratio, '{:.1f}x'):>7}")
    for key, target in TARGETS.items():
        values = [value for value in (getattr(run, key) for run in runs) if value is not None]
        if values:
            met = sum(value >= target for value in values)
            lines.append(f"{key}: median {statistics.median(values):.4g}, target {target:g} met in {met} of "
                         f"{len(values)} benches")
    return lines


def _text(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


def plot(runs: list[BenchRun], path: Path, kind: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("batch1_roofline", "batch 1: fraction of the roofline", 100.0, "%"),
              ("workload2_tok_s", "workload 2: output tok/s", 1.0, "tok/s"),
              ("workload3_ratio", "workload 3: Joule / generate_batch", 1.0, "x"))
    figure, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 0.45 * len(runs)), 9), sharex=True)
    positions = range(len(runs))
    for axis, (key, title, scale, unit) in zip(axes, panels):
        values = [getattr(run, key) for run in runs]
        shown = [(x, value * scale) for x, value in zip(positions, values) if value is not None]
        if shown:
            axis.plot(*zip(*shown), marker="o")
        axis.axhline(TARGETS[key] * scale, color="tab:red", linestyle="--", label=f"target {TARGETS[key] * scale:g}")
        axis.set_title(title)
        axis.set_ylabel(unit)
        axis.legend(loc="lower right")
        axis.grid(alpha=0.3)
        if key == "workload3_ratio":  # what moves the ratio: the peer more than Joule
            twin = axis.twinx()
            # Joule's tok/s over the target ratio beside the peer's: above it wherever the target is met.
            for name, divisor, color in (("peer_tok_s", 1e3, "tab:gray"),
                                         ("workload3_tok_s", 1e3 * TARGETS["workload3_ratio"], "tab:green")):
                shown = [(x, getattr(run, name) / divisor) for x, run in zip(positions, runs) if getattr(run, name)]
                if shown:
                    twin.plot(*zip(*shown), color=color, alpha=0.5, linestyle=":", marker=".",
                              label="generate_batch" if name == "peer_tok_s" else f"Joule / {TARGETS['workload3_ratio']:g}")
            twin.set_ylabel("k output tok/s (dotted)")
            twin.legend(loc="upper left", fontsize=8)
    axes[-1].set_xticks(list(positions), [run.label for run in runs], rotation=60, ha="right", fontsize=8)
    figure.suptitle(f"engine_bench.py on {kind.upper()} over every saved call")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="h100", help="the results folders' prefix (h100, h200)")
    parser.add_argument("--root", default=str(GPU_RESULTS), help="where the <kind>_<date> folders are")
    parser.add_argument("--plot", default=None, help="PNG path for the three panels")
    parser.add_argument("--since", default="", help="only sessions from this folder date on, e.g. 2026-12-06k")
    args = parser.parse_args(argv)
    runs = [run for run in collect_runs(Path(args.root), args.kind) if run.label.split()[0] >= args.since]
    if not runs:
        raise SystemExit(f"no engine_bench JSON under {args.root}/{args.kind}_*")
    print("\n".join(summary_lines(runs)))
    if args.plot:
        print(f"plot: {plot(runs, Path(args.plot), args.kind)}")


if __name__ == "__main__":
    main()
