"""Visual-token budgets: how many tokens per image the LLM receives.

A budget is either ``full`` (no reduction) or a split ``dominant + contextual``.
The paper's three budgets map to its published splits (Table 8 / README):

    64 -> 54+10,  128 -> 108+20,  192 -> 162+30

Any other total T uses the same ratio: ``contextual = max(1, round(T * 5 / 32))`` and
``dominant = T - contextual`` (5/32 = 10/64 = 20/128 = 30/192), so 32 -> 27+5 and
256 -> 216+40. Pass an explicit ``"D+C"`` split to choose otherwise.

``dominant`` counts the CLS token: ``54+10`` keeps CLS, 53 patches and 10 merged tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PAPER_SPLITS: dict[int, tuple[int, int]] = {64: (54, 10), 128: (108, 20), 192: (162, 30)}
CONTEXTUAL_FRACTION = 5 / 32

_SPLIT = re.compile(r"^\s*(-?\d+)\s*\+\s*(-?\d+)\s*$")
_TOTAL = re.compile(r"^\s*(-?\d+)\s*$")
_FULL = {"full", "none", "vanilla"}


@dataclass(frozen=True)
class Budget:
    """A per-image visual-token budget. ``dominant is None`` means no reduction."""

    dominant: int | None = None
    contextual: int | None = None

    def __post_init__(self) -> None:
        if (self.dominant is None) != (self.contextual is None):
            raise ValueError("a budget sets both dominant and contextual, or neither (full)")
        if self.dominant is None:
            return
        for name in ("dominant", "contextual"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.dominant < 1:
            raise ValueError(
                f"dominant must be >= 1 (it always includes the CLS token), got {self.dominant}"
            )
        if self.contextual < 1:
            raise ValueError(f"contextual must be >= 1, got {self.contextual}")

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def full(cls) -> Budget:
        return cls()

    @classmethod
    def from_total(cls, total: int) -> Budget:
        """The split for a total: the paper's for 64/128/192, the 5/32 rule otherwise."""
        if isinstance(total, bool) or not isinstance(total, int):
            raise ValueError(f"a budget total must be an integer, got {total!r}")
        if total < 2:
            raise ValueError(
                f"a budget total must be >= 2 (one dominant + one contextual token), got {total}"
            )
        if total in PAPER_SPLITS:
            return cls(*PAPER_SPLITS[total])
        contextual = max(1, round(total * CONTEXTUAL_FRACTION))
        return cls(total - contextual, contextual)

    @classmethod
    def parse(cls, value: Budget | int | str | None) -> Budget:
        """Accepts a Budget, ``None``/``"full"``, a total (``64``, ``"64"``) or a split (``"54+10"``)."""
        if isinstance(value, Budget):
            return value
        if value is None:
            return cls.full()
        if isinstance(value, int) and not isinstance(value, bool):
            return cls.from_total(value)
        if isinstance(value, str):
            text = value.strip().lower()
            if text in _FULL:
                return cls.full()
            if m := _SPLIT.match(text):
                return cls(int(m.group(1)), int(m.group(2)))
            if m := _TOTAL.match(text):
                return cls.from_total(int(m.group(1)))
        raise ValueError(
            f"invalid budget {value!r}: use 'full', a total such as 64/128/192, "
            "or a split 'dominant+contextual' such as '54+10'"
        )

    # -- properties -----------------------------------------------------------------------
    @property
    def is_full(self) -> bool:
        return self.dominant is None

    @property
    def total(self) -> int | None:
        return None if self.is_full else self.dominant + self.contextual

    @property
    def label(self) -> str:
        """Stable text form, used in run names: ``full``, ``64`` (paper split) or ``50+14``."""
        if self.is_full:
            return "full"
        if PAPER_SPLITS.get(self.total) == (self.dominant, self.contextual):
            return str(self.total)
        if Budget.from_total(self.total) == self:
            return str(self.total)
        return f"{self.dominant}+{self.contextual}"

    def check_fits(self, tower_tokens: int) -> None:
        """Raise if the budget cannot be taken from ``tower_tokens`` tokens (CLS included)."""
        if self.is_full:
            return
        if self.total > tower_tokens:
            raise ValueError(
                f"budget {self.dominant}+{self.contextual}={self.total} exceeds the vision tower's "
                f"{tower_tokens} tokens (dominant + contextual must be <= {tower_tokens})"
            )

    def __str__(self) -> str:
        return self.label
