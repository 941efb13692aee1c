"""The recipe's dataclasses and the error a user fixes in the recipe: the bottom of the tree.

Every other package may import this one; it imports none of them. Reading a recipe (TOML +
command line) is ``config/loader.py``; ``training/recipe.py`` adds the checks against other
packages' facts (flavors, the loss registry, the initial load folder).
"""

from config.errors import ConfigError
from config.job_config import JobConfig

__all__ = ["ConfigError", "JobConfig"]
