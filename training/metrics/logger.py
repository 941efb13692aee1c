"""Rank 0's report of a logged step: one console line, and the same figures to every writer."""

import logging
import math
from typing import Optional

from config.job_config import JobConfig
from training.metrics.writers import MetricsWriter, open_writers

logger = logging.getLogger("train")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class MetricsLogger:
    """Written by rank 0 only (``active``); figures are already reduced across ranks. Opened once every
    start-up check has passed, so that a refused run leaves no metrics behind."""

    def __init__(self, cfg: JobConfig, start_step: int, active: bool):
        self.writers: list[MetricsWriter] = open_writers(cfg, start_step) if active else []
        self.active = active

    def log(self, step: int, total_steps: int, figures: dict, eta_seconds: float, note: str = "") -> None:
        """One console line and one record; the console line says which figures were non-finite and
        why (``note``)."""
        if not self.active:
            return
        note = self._write(step, figures, note)
        mfu = f"  mfu {figures['mfu_percent']:5.1f}%" if figures.get("mfu_percent") is not None else ""
        logger.info(
            f"step {step:>{len(str(total_steps))}}/{total_steps}  loss {figures['loss']:.4f}  lr {figures['lr']:.2e}"
            f"  grad_norm {figures['grad_norm']:.3f}  tok/s {figures['tokens_per_second']:,.0f}{mfu}"
            f"  mem {figures['peak_memory_gib']:.2f}GiB  eta {_duration(eta_seconds)}" + (f"  ({note})" if note else "")
        )

    def log_validation(self, step: int, total_steps: int, figures: dict) -> None:
        """``validation_loss`` and ``validation_perplexity``: a record and a console line of their own."""
        if not self.active:
            return
        note = self._write(step, figures, "")
        logger.info(
            f"step {step:>{len(str(total_steps))}}/{total_steps}  validation_loss "
            f"{figures['validation_loss']:.4f}  validation_perplexity {figures['validation_perplexity']:.2f}"
            + (f"  ({note})" if note else "")
        )

    def _write(self, step: int, figures: dict, note: str) -> str:
        """The figures to every writer, a non-finite one as None (JSON ``null``: strict parsers reject a bare
        NaN); returns ``note`` prefixed with the figures that were."""
        finite: dict[str, Optional[float]] = {
            k: v if v is None or math.isfinite(v) else None for k, v in figures.items()
        }
        for writer in self.writers:
            writer.log(step, finite)
        bad = [k for k, v in figures.items() if finite[k] is None and v is not None]
        return f"non-finite {', '.join(bad)}" + (f": {note}" if note else "") if bad else note

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []
