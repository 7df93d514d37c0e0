"""Benchmark results as a README table and as a plot.

The README's benchmark table is never typed by hand: ``fastnst bench --report DIR`` prints it from
the ``fastnst bench`` JSON files committed in DIR (one file per run), naming device and date.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import ConfigError, UsageError
from .files import atomic_write

PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def load_results(folder: str | Path) -> list[dict]:
    """Every ``fastnst bench`` result file in ``folder`` or its subfolders (a GPU check's folder
    is committed whole), oldest first; other JSON is ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"--report: '{folder}' is not a folder")
    runs = []
    for path in sorted(folder.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--report: cannot read '{path}' ({exc})") from None
        if isinstance(data, dict) and data.get("kind") == "fastnst bench":
            data["file"] = path.relative_to(folder).as_posix()
            runs.append(data)
    return sorted(runs, key=lambda run: run["meta"]["date"])


def markdown_table(runs: list[dict]) -> str:
    """One row per measured (size, optimiser, mode) of every run, with its device and date."""
    lines = ["| device | date | size | optimiser | mode | s/iter | vs reference | model TFLOP/s | peak MiB | "
             "published (s/iter, our speed-up) | results file |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        device, date = run["meta"]["device"], run["meta"]["date"][:10]
        for row in run["results"]:
            if row["s_per_iter"] is None:
                continue
            versus = f"{row['speedup_vs_reference']:.2f}x" if row["speedup_vs_reference"] else "-"
            memory = f"{row['peak_memory_bytes'] / 2**20:.0f}" if row["peak_memory_bytes"] else "-"
            published = "; ".join(f"{p['gpu']} {p['s_per_iter']:.3f} ({p['speedup']:.1f}x)"
                                  for p in row["published"] if p["s_per_iter"]) or "-"
            lines.append(f"| {device} | {date} | {row['size']} | {row['optimizer']} | {row['mode']} | "
                         f"{row['s_per_iter']:.4f} | {versus} | {row['model_tflops']:.2f} | {memory} | "
                         f"{published} | `{run['file']}` |")
    headlines = [f"- {run['meta']['device']} ({run['meta']['date'][:10]}): "
                 f"{run['headline']['megapixel_iterations_per_second']:.2f} megapixel-iterations/s "
                 f"({run['headline']['optimizer']}, {run['headline']['size']} px, fast path)"
                 for run in runs if run.get("headline")]
    return "\n".join(["Headline figures:", "", *headlines, "", *lines])


def check_plot_path(path: str) -> Path:
    """Before any work: a known suffix, a writable folder, and matplotlib installed."""
    from .files import check_writable

    target = Path(path)
    if target.suffix.lower() not in PLOT_SUFFIXES:
        raise ConfigError(f"--plot: use one of {', '.join(PLOT_SUFFIXES)}, not '{target.suffix or target.name}'")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'fastnst[plot]'") from None
    return check_writable(target, ConfigError)


def plot(rows: list[dict], published: list[dict], path: str, title: str) -> Path:
    """Seconds per iteration against megapixels, log-log: one line per (mode, optimiser), and the
    published figures as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for row in rows:
        if row["s_per_iter"]:
            series.setdefault((row["mode"], row["optimizer"]), []).append((row["size"] ** 2 / 1e6, row["s_per_iter"]))
    for (mode, optimizer), points in sorted(series.items()):
        points.sort()
        axes.plot(*zip(*points), marker="o", label=f"fastnst {mode}, {optimizer}" if mode != "reference"
                  else f"textbook reference, {optimizer}")
    for p in published:
        if p["s_per_iter"]:
            axes.scatter([p["size"] ** 2 / 1e6], [p["s_per_iter"]], marker="x", color="grey")
            axes.annotate(f"{p['gpu']} ({p['optimizer']})", (p["size"] ** 2 / 1e6, p["s_per_iter"]),
                          fontsize=6, color="grey", xytext=(3, 3), textcoords="offset points")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("megapixels")
    axes.set_ylabel("seconds per iteration")
    axes.set_title(title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7)
    figure.tight_layout()
    suffix = Path(path).suffix.lower()[1:]
    written = atomic_write(path, lambda stream: figure.savefig(stream, format=suffix, dpi=120), ConfigError)
    plt.close(figure)
    return written
