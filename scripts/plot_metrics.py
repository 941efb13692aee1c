"""Plot the metrics.jsonl of one or several runs into one PNG.

    python scripts/plot_metrics.py outputs/run_a outputs/run_b -o curves.png
    python scripts/plot_metrics.py outputs/debug/metrics.jsonl --labels baseline

Each run is a dump folder (its metrics.jsonl is read) or a .jsonl path. Panels: loss, tokens/s,
and validation loss, grad norm and peak memory where the runs logged them; runs are overlaid,
labelled by folder name unless --labels says otherwise. A run resumed or rolled back in the same
folder is drawn as the branch that continued (training/metrics/records.py); a line that is not a
record (a torn write) is skipped with one warning per file. The PNG's folder is created if missing.
Needs matplotlib (pip install matplotlib).
"""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python scripts/plot_metrics.py`: the repository is one folder up
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.metrics.records import continued_branch, parse

# (key in metrics.jsonl, y-axis label); loss and tokens/s always, the others when logged.
PANELS = [
    ("loss", "loss"),
    ("validation_loss", "validation loss (held-out data)"),
    ("tokens_per_second", "tokens/s per rank"),
    ("grad_norm", "grad norm (before clipping)"),
    ("peak_memory_gib", "peak memory, rank 0 (GiB)"),
]
ALWAYS = {"loss", "tokens_per_second"}


class InputError(Exception):
    pass


def load_run(path: Path) -> list[dict]:
    """The records of the branch that continued in one run's metrics.jsonl; lines that are not records are
    skipped with one warning (on stderr) naming the file and line. InputError: no file, or no steps in it."""
    file = path / "metrics.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"{file}: no such file")
    with open(file, errors="replace") as f:
        records, bad = parse(f)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        print(
            f"plot_metrics.py: warning: {file}:{bad[0]}{more}: not a metrics record (a JSON object with a "
            "'step'), skipped",
            file=sys.stderr,
        )
    rows = continued_branch(records)
    if not rows:
        raise InputError(f"{file}: empty, no steps logged")
    return rows


def default_label(path: Path) -> str:
    # outputs/run_a and outputs/run_a/metrics.jsonl are both "run_a".
    if path.is_dir():
        return path.resolve().name
    return path.resolve().parent.name if path.name == "metrics.jsonl" else path.stem


def drawn_panels(runs: dict[str, list[dict]]) -> list[tuple[str, str]]:
    """The (key, y-axis label) of every panel drawn for these runs, in order."""
    logged = {key for rows in runs.values() for row in rows for key, value in row.items() if value is not None}
    return [(key, label) for key, label in PANELS if key in ALWAYS or key in logged]


def plot(runs: dict[str, list[dict]], output: Path) -> None:
    import matplotlib.pyplot as plt

    panels = drawn_panels(runs)
    ncols = 2
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 3.8 * nrows), squeeze=False)
    for ax, (key, ylabel) in zip(axes.flat, panels):
        for name, rows in runs.items():
            points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
            ax.plot(
                [s for s, _ in points], [v for _, v in points], label=name, marker="." if len(points) < 50 else None
            )
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(output, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="dump folders or metrics .jsonl files")
    parser.add_argument(
        "-o", "--output", type=Path, default=Path("metrics.png"), help="PNG to write (default metrics.png)"
    )
    parser.add_argument("--labels", help="comma-separated legend labels, one per run (default: folder names)")
    args = parser.parse_args(argv)

    labels = args.labels.split(",") if args.labels else [default_label(p) for p in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"--labels has {len(labels)} labels for {len(args.runs)} runs")
    if len(set(labels)) != len(labels):
        parser.error(f"two runs share a label ({', '.join(labels)}); name them with --labels")
    try:
        runs = {label: load_run(path) for label, path in zip(labels, args.runs)}
    except InputError as err:
        print(f"plot_metrics.py: {err}", file=sys.stderr)
        return 1
    try:
        import matplotlib
    except ImportError:
        print("plot_metrics.py: needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 1
    matplotlib.use("Agg")  # files only: no display on a cluster node
    try:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        plot(runs, args.output)
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        print(f"plot_metrics.py: cannot write {args.output} ({err.strerror or err}{where})", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({len(runs)} run(s): {', '.join(runs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
