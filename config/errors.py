"""Errors a user can fix by editing the recipe or the command line."""


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
