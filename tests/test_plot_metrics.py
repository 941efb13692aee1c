"""scripts/plot_metrics.py: a PNG from two runs, and one-line errors for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.plot_metrics import drawn_panels, load_run

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "plot_metrics.py"


def _write_run(folder: Path, steps: int, start_loss: float, validation_freq: int = 0) -> Path:
    """A metrics.jsonl as train.py writes it on the CPU (mfu_percent null), with a validation record of
    its own every ``validation_freq`` steps."""
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "loss": start_loss / step,
                        "lr": 1e-3,
                        "grad_norm": 2.0 / step,
                        "tokens_per_second": 100.0 * step,
                        "mfu_percent": None,
                        "peak_memory_gib": 0.4,
                    }
                )
                + "\n"
            )
            if validation_freq and step % validation_freq == 0:
                f.write(
                    json.dumps(
                        {
                            "step": step,
                            "validation_loss": start_loss / step + 0.5,
                            "validation_perplexity": 2.0 ** (start_loss / step),
                        }
                    )
                    + "\n"
                )
    return folder


def _plot(*args):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_two_runs_make_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    run_a = _write_run(tmp_path / "run_a", 6, 8.0)
    run_b = _write_run(tmp_path / "run_b", 4, 7.0)
    out = tmp_path / "curves.png"
    # A folder and a .jsonl path are both accepted.
    result = _plot(run_a, run_b / "metrics.jsonl", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "run_a, run_b" in result.stdout
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 10_000  # four panels of curves, not an empty canvas

    result = _plot(run_a, run_b, "--labels", "baseline,chunked", "-o", out)
    assert result.returncode == 0 and "baseline, chunked" in result.stdout, result.stderr


def test_a_validation_panel_when_a_run_validated(tmp_path):
    plain = load_run(_write_run(tmp_path / "plain", 4, 8.0))
    validated = load_run(_write_run(tmp_path / "validated", 4, 8.0, validation_freq=2))
    assert "validation_loss" not in [key for key, _ in drawn_panels({"plain": plain})]
    assert [key for key, _ in drawn_panels({"plain": plain, "validated": validated})][:2] == ["loss", "validation_loss"]

    pytest.importorskip("matplotlib")
    out = tmp_path / "curves.png"
    result = _plot(tmp_path / "plain", tmp_path / "validated", "-o", out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _error(result) -> str:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_bad_input_is_one_line_that_names_the_file_and_line(tmp_path):
    assert _error(_plot(tmp_path / "gone")) == f"plot_metrics.py: {tmp_path / 'gone'}: no such file"
    assert _error(_plot(tmp_path)) == f"plot_metrics.py: {tmp_path / 'metrics.jsonl'}: no such file"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert _error(_plot(empty)) == f"plot_metrics.py: {empty}: empty, no steps logged"
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n')
    assert _error(_plot(broken)).startswith(f"plot_metrics.py: {broken}:2: not JSON")


def test_without_matplotlib_it_says_what_to_install(tmp_path):
    run = _write_run(tmp_path / "run", 2, 8.0)
    # sys.modules[name] = None makes `import name` fail as if it were not installed.
    code = (
        "import runpy, sys; sys.modules['matplotlib'] = None; "
        f"sys.argv = ['plot_metrics.py', {str(run)!r}]; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert _error(result) == "plot_metrics.py: needs matplotlib: pip install matplotlib"
