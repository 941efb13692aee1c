"""Errors a user can fix by editing the recipe or the command line."""

import difflib
from typing import Iterable


class ConfigError(ValueError):
    """A recipe key has a bad value; the message names the key and the fix.

    ``train.py`` prints it as one line and exits non-zero, before any model is built.
    """

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config error: {key}: {message}")


class CheckpointError(RuntimeError):
    """A checkpoint or Hugging Face folder that cannot be loaded; the message says what differs and the fix.

    ``train.py`` prints it as one line and exits non-zero.
    """


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the candidate closest to a misspelt ``word``, else ``""``."""
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def require(condition: bool, key: str, message: str) -> None:
    """Raise ``ConfigError(key, message)`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(key, message)
