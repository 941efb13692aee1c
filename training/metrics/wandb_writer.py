"""Weights & Biases (``metrics.enable_wandb``), rank 0 only, configured by W&B's own environment variables.

A training run must not wait on a logging service: unless ``WANDB_MODE`` says otherwise, the run logs online
only when an API key is found and the W&B server answers within seconds, and falls back to offline (files
under ``<dump_folder>/wandb``, uploaded later by ``wandb sync``) with one warning when it does not or when the
online start fails. A key is looked for first so that ``wandb.init`` never stops to ask for a login.
"""

import dataclasses
import logging
import netrc
import os
import socket
import threading
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from config.job_config import JobConfig

logger = logging.getLogger("train")

PROBE_SECONDS = 5.0
_DEFAULT_PROJECT = "headroom"


def _has_api_key(host: str) -> bool:
    """``WANDB_API_KEY``, or the netrc entry ``wandb login`` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def server_answers(host: str, port: int, timeout: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to ``host`` opens within ``timeout`` seconds, the name lookup included (in a
    thread of its own: without a network the lookup alone can block longer than any socket timeout)."""
    answered = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, name="wandb-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def _offline_reason() -> Optional[str]:
    """Why this run cannot log online (None: it can try)."""
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host, port = url.hostname or "api.wandb.ai", url.port or (443 if url.scheme == "https" else 80)
    if not _has_api_key(host):
        return "no API key (set WANDB_API_KEY or run `wandb login`)"
    if not server_answers(host, port):
        return f"{host}:{port} does not answer"
    return None


class WandbWriter:
    """One W&B run per launch; its config is the effective recipe."""

    def __init__(self, cfg: JobConfig, start_step: int):
        import wandb

        folder = Path(cfg.job.dump_folder)
        options = {
            "dir": None if os.environ.get("WANDB_DIR") else str(folder),
            "config": {**dataclasses.asdict(cfg), "start_step": start_step},
            "project": None if os.environ.get("WANDB_PROJECT") else _DEFAULT_PROJECT,
        }
        mode = os.environ.get("WANDB_MODE") or None  # the user's choice is taken as it is
        where = Path(os.environ.get("WANDB_DIR") or folder) / "wandb"
        offline = f"logging offline under {where} (upload it later with `wandb sync`)"
        if mode is None:
            reason = _offline_reason()
            if reason is not None:
                logger.warning(f"W&B: {reason}; {offline}; WANDB_MODE=online skips this check")
                mode = "offline"
        try:
            self.run = wandb.init(mode=mode, **options)
        except Exception as err:
            if mode is not None:
                raise
            cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            logger.warning(f"W&B: the online start failed ({cause}); {offline}")
            self.run = wandb.init(mode="offline", **options)

    def log(self, step: int, scalars: dict[str, Optional[float]]) -> None:
        self.run.log({k: v for k, v in scalars.items() if v is not None}, step=step)

    def close(self) -> None:
        self.run.finish()
