"""Where rank 0's figures go: ``metrics.jsonl`` always, TensorBoard and Weights & Biases when enabled, each
behind the same two calls (``MetricsWriter``)."""

import importlib.util
import json
import sys
from pathlib import Path
from typing import Optional, Protocol

from config.errors import ConfigError
from config.job_config import JobConfig, Metrics
from training.metrics.records import last_step, run_record

_PACKAGES = {"enable_tensorboard": "tensorboard", "enable_wandb": "wandb"}  # what each backend imports


class MetricsWriter(Protocol):
    def log(self, step: int, scalars: dict[str, Optional[float]]) -> None:
        """One step's figures; a None (a non-finite figure) is written as JSON null or left out."""

    def close(self) -> None: ...


class JsonlWriter:
    """``<dump_folder>/metrics.jsonl``, appended: every run begins its part with a run record
    (training/metrics/records.py), so that readers can tell a resume or a rollback from the run that continued."""

    def __init__(self, folder: Path, start_step: int):
        path = folder / "metrics.jsonl"
        previous = last_step(path)
        self.file = open(path, "a")
        self._write(run_record(start_step, previous))

    def _write(self, record: dict) -> None:
        self.file.write(json.dumps(record, allow_nan=False) + "\n")
        self.file.flush()

    def log(self, step: int, scalars: dict[str, Optional[float]]) -> None:
        self._write({"step": step, **scalars})

    def close(self) -> None:
        self.file.close()


class TensorBoardWriter:
    """``<dump_folder>/tensorboard``; a run hides what earlier runs logged after its start step
    (TensorBoard's ``purge_step``), so a resume or a rollback draws the branch that continued."""

    def __init__(self, folder: Path, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=start_step + 1)

    def log(self, step: int, scalars: dict[str, Optional[float]]) -> None:
        for key, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


def _installed(package: str) -> bool:
    if package in sys.modules:  # None there: made unimportable on purpose
        return sys.modules[package] is not None
    return importlib.util.find_spec(package) is not None


def check_backends(metrics: Metrics) -> None:
    """Every enabled backend's package is installed: one line that says what to install, before anything is built."""
    for key, package in _PACKAGES.items():
        if getattr(metrics, key) and not _installed(package):
            raise ConfigError(f"metrics.{key}", f"needs the {package} package: pip install {package}")


def open_writers(cfg: JobConfig, start_step: int) -> list[MetricsWriter]:
    """The run's writers (rank 0's), opened once every start-up check has passed."""
    folder = Path(cfg.job.dump_folder)
    writers: list[MetricsWriter] = [JsonlWriter(folder, start_step)]
    if cfg.metrics.enable_tensorboard:
        writers.append(TensorBoardWriter(folder, start_step))
    if cfg.metrics.enable_wandb:
        from training.metrics.wandb_writer import WandbWriter

        writers.append(WandbWriter(cfg, start_step))
    return writers
