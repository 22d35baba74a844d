"""Memory sizes as ``xl`` takes them: ``512m``, ``1g``, ``4096k``; a bare number is MiB.

The one size parser of the tools (``hvemu`` and ``scripts/run.sh``), so that
every size option reads the same, and a :class:`Size` keeps the text the user
typed: an error message speaks in the user's units (``--memory 1g is above
...``), not in pages or bytes the user never wrote.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

from hvemu.abi import PAGE_SIZE, MiB

KiB = 1 << 10
GiB = 1 << 30

_UNITS = {"": MiB, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1 << 40}
#: A number, then an optional unit (``k``, ``KiB``, ``kb``... case-insensitive; ``b`` is bytes).
_SIZE = re.compile(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?|[-+]?(?:nan|inf|infinity))\s*"
                   r"(?:([kmgt])(?:i?b)?|(b))?\s*", re.IGNORECASE)
#: How a size is written back: the help of every size option says it once.
SIZE_HELP = "a size: 512m, 1g, 4096k (a bare number is MiB)"


class SizeError(ValueError):
    """A text that is no size; the message completes ``"<option> <text> "``."""


class Size(NamedTuple):
    """A size in bytes and the text it was read from."""

    bytes: float
    text: str

    @property
    def mib(self) -> float:
        return self.bytes / MiB

    @property
    def pages(self) -> int:
        """Whole pages (rounded down: a size never claims memory it was not given)."""
        return int(self.bytes) // PAGE_SIZE

    @property
    def bare(self) -> bool:
        """Typed without a unit (so MiB)."""
        return self.text.strip()[-1:].isdigit() or self.text.strip().lower().endswith(("nan", "inf", "infinity"))

    def __str__(self) -> str:
        """As typed, with ``MiB`` after a bare number: ``64 MiB``, ``1g``."""
        return f"{self.text.strip()} MiB" if self.bare else self.text.strip()


def parse_size(text: str) -> Size:
    """``text`` as a :class:`Size` (negative sizes are read: the caller says why they are refused).

    Raises :class:`SizeError` for anything that is not a finite size.
    """
    m = _SIZE.fullmatch(text)
    if m is None:
        raise SizeError(f"is not a size ({SIZE_HELP})")
    value = float(m.group(1))
    if not math.isfinite(value):
        raise SizeError("is not a finite number")
    unit = (m.group(2) or m.group(3) or "").lower()
    return Size(value * _UNITS[unit], text)


def mib_text(nbytes: float) -> str:
    """Bytes as MiB for people: ``64``, ``12.5``, ``0.02`` (no trailing ``.0``)."""
    mib = nbytes / MiB
    if mib.is_integer():
        return str(int(mib))
    return f"{mib:.2f}".rstrip("0").rstrip(".") if abs(mib) >= 0.01 else f"{mib:.3g}"


def gib_or_mib(nbytes: float) -> str:
    """A size as a person would say it: ``16 GiB``, ``97.7 GiB``, ``512 MiB``."""
    if nbytes >= GiB:
        gib = nbytes / GiB
        return f"{gib:.0f} GiB" if gib.is_integer() else f"{gib:.1f} GiB"
    return f"{mib_text(nbytes)} MiB"
