"""Rules for numeric configuration values (`integer`, `number`) and `check_rules`, which
turns the first broken one into the runner's one-line error. The runner's rules are in
hat/checks.py, each model's in its plug-in's ``key_rules``."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    """What a numeric configuration value may be: an integer (``integer``) or any number,
    within bounds, None allowed or not; ``allowed`` is the text of the one-line error."""

    integer: bool
    low: float | None = None
    low_open: bool = False
    high: float | None = None
    high_open: bool = False
    none: bool = False
    why: str = ""

    def holds(self, value) -> bool:
        if value is None:
            return self.none
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    @property
    def allowed(self) -> str:
        kind = "integer" if self.integer else "number"
        article = "an" if self.integer else "a"
        if self.integer and self.low == 1 and self.high is None:
            text = "a positive integer"
        elif self.integer and self.low == 0 and self.high is None:
            text = "a non-negative integer"
        elif self.low is not None and self.high is not None:
            text = (f"{article} {kind} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        elif self.low is not None:
            text = f"{article} {kind} {'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = f"{article} {kind}"
        return ("None or " if self.none else "") + text + (f" ({self.why})" if self.why else "")


def integer(at_least=None, none: bool = False, why: str = "") -> Rule:
    return Rule(True, low=at_least, none=none, why=why)


def number(above=None, at_least=None, below=None, at_most=None, none: bool = False, why: str = "") -> Rule:
    return Rule(False, low=above if above is not None else at_least, low_open=above is not None,
                high=below if below is not None else at_most, high_open=below is not None, none=none, why=why)


def check_rules(config, rules: dict, fail) -> None:
    """``fail(key, allowed)`` for the first key of ``rules`` whose value breaks its rule
    (keys this configuration lacks are skipped)."""
    for key, rule in rules.items():
        if key in config and not rule.holds(config[key]):
            fail(key, rule.allowed)
