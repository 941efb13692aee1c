"""Rules on one key's value, declared in its type: ``steps: Annotated[int, Range(gt=0)] = 20``.

The loader checks them (``config/loader.py``) and ``scripts/config_docs.py`` prints them in the
"allowed values" column of docs/config.md, so the rule and its documentation cannot drift.
Rules between keys are the dataclasses' ``check()`` methods; every float key is also refused
when it is not finite, by one rule in the loader.
"""

from dataclasses import dataclass
from typing import Optional


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


@dataclass(frozen=True)
class Range:
    """A number within bounds, or one of ``also`` (values with a meaning of their own, e.g. -1: derived).

    ``message`` is the error when the value is outside; by default it states the bounds. Several on
    one key are checked in order, each narrower than the one before (a general message, then a
    specific one); the docs print the last.
    """

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    also: tuple[float, ...] = ()
    message: str = ""

    def problem(self, value: float) -> Optional[str]:
        """What is wrong with ``value``, or None (a value of another alternative of the key's type, such
        as ``"auto"``, is the type's to check)."""
        if isinstance(value, (str, bool)):
            return None
        inside = (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
        )
        return None if inside or value in self.also else self.message or f"must be {self._bounds()}"

    def _bounds(self) -> str:
        if self.ge is not None and self.le is not None:
            return f"in [{_number(self.ge)}, {_number(self.le)}]"
        if self.gt == 0 and self.le is None:
            return "positive"
        parts = [f"{op} {_number(x)}" for op, x in ((">=", self.ge), (">", self.gt), ("<=", self.le)) if x is not None]
        return " and ".join(parts)

    def allowed(self) -> str:
        """The docs' "allowed values" cell (Markdown)."""
        if self.ge is not None and self.le is not None:
            bounds = f"`[{_number(self.ge)}, {_number(self.le)}]`"
        else:
            ops = ((">=", self.ge), (">", self.gt), ("<=", self.le))
            bounds = ", ".join(f"`{op} {_number(x)}`" for op, x in ops if x is not None)
        return " or ".join([*(f"`{_number(x)}`" for x in self.also), bounds])


@dataclass(frozen=True)
class NonEmpty:
    """A string that is not empty; ``message`` says what to set it to."""

    message: str

    def problem(self, value: str) -> Optional[str]:
        return None if value else self.message

    def allowed(self) -> str:
        return "any non-empty string"
