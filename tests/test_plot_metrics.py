"""scripts/plot_metrics.py: a PNG from two runs, the branch that continued after a rollback, and one line for
bad input (an error, or a warning for a line that is not a record)."""

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
    only_a_start = tmp_path / "started.jsonl"
    only_a_start.write_text('{"event": "start", "step": 0}\n')
    assert _error(_plot(only_a_start)) == f"plot_metrics.py: {only_a_start}: empty, no steps logged"


def _record(step: int, loss: float) -> str:
    return json.dumps({"step": step, "loss": loss, "tokens_per_second": 100.0}) + "\n"


def test_a_rollback_is_drawn_as_the_branch_that_continued(tmp_path):
    """Steps 3-4 and a validation at 4 written before a resume from step 2 are an abandoned branch."""
    lines = [
        '{"event": "start", "step": 0}\n',
        *(_record(s, 10.0 - s) for s in (1, 2, 3, 4)),
        '{"step": 4, "validation_loss": 6.5}\n',
        '{"event": "resume", "step": 2, "rolled_back_from": 4}\n',
        _record(3, 5.5),
        _record(4, 5.0),
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    rows = load_run(tmp_path)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 9.0), (2, 8.0), (3, 5.5), (4, 5.0)]

    # A rerun from scratch keeps only its own records.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"event": "start", "step": 0, "rolled_back_from": 4}\n' + _record(1, 7.0))
    assert [(r["step"], r["loss"]) for r in load_run(tmp_path)] == [(1, 7.0)]


def test_a_line_that_is_not_a_record_is_one_warning_and_the_png_goes_where_asked(tmp_path):
    pytest.importorskip("matplotlib")
    torn = tmp_path / "torn.jsonl"  # a stray "}" and a half-written line, as two writers of one file left them
    torn.write_text(_record(1, 3.0) + "}\n" + _record(2, 2.0) + '{"step": 3, "lo\n' + _record(3, 1.0))
    out = tmp_path / "missing" / "folder" / "curves.png"
    result = _plot(torn, "-o", out)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"plot_metrics.py: warning: {torn}:2 and 1 more: not a metrics record (a JSON object with a 'step'), skipped"
    ]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["loss"] for r in load_run(torn)] == [3.0, 2.0, 1.0]

    (tmp_path / "a_file").write_text("")
    (tmp_path / "clean.jsonl").write_text(_record(1, 3.0))
    assert _error(_plot(tmp_path / "clean.jsonl", "-o", tmp_path / "a_file" / "x.png")) == (
        f"plot_metrics.py: cannot write {tmp_path / 'a_file' / 'x.png'} (File exists: {tmp_path / 'a_file'})"
    )


def test_without_matplotlib_it_says_what_to_install(tmp_path):
    run = _write_run(tmp_path / "run", 2, 8.0)
    # sys.modules[name] = None makes `import name` fail as if it were not installed.
    code = (
        "import runpy, sys; sys.modules['matplotlib'] = None; "
        f"sys.argv = ['plot_metrics.py', {str(run)!r}]; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert _error(result) == "plot_metrics.py: needs matplotlib: pip install matplotlib"
