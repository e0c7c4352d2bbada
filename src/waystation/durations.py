"""Go's `time.ParseDuration`, for durations written by or for Go programs.

Grammar: `[-+]?([0-9]*(\\.[0-9]*)?[a-z]+)+`, or a bare "0"; units are ns, us, µs,
μs, ms, s, m, h. Values are kept in integer nanoseconds with Go's int64 range and
Go's error messages; only the scaling of a fractional part goes through float64,
exactly as Go does it.
"""

from __future__ import annotations

import datetime

__all__ = [
    "MAX_DURATION_LENGTH",
    "DurationError",
    "parse_go_duration",
    "parse_go_duration_ns",
]

# The text comes from the network; no valid duration needs more.
MAX_DURATION_LENGTH = 128

_UNITS: dict[str, int] = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # MICRO SIGN
    "\u03bcs": 1_000,  # GREEK SMALL LETTER MU
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}

# Go accumulates the magnitude in a uint64 and allows up to 2**63 so that the
# most negative int64 duration is reachable.
_LIMIT = 1 << 63


class DurationError(ValueError):
    """The text is not a Go duration, or the duration does not fit in int64 nanoseconds."""


def _go_quote(text: str) -> str:
    # Mirrors Go's time.quote: bytes of control and non-ASCII characters as \xNN.
    out = ['"']
    for ch in text:
        if ch < " " or ord(ch) >= 0x80:
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogatepass"))
        else:
            if ch in '"\\':
                out.append("\\")
            out.append(ch)
    out.append('"')
    return "".join(out)


def _is_digit(ch: str) -> bool:
    # str.isdigit() would accept other scripts' digits, which Go rejects.
    return "0" <= ch <= "9"


def _leading_int(s: str, pos: int) -> tuple[int | None, int]:
    """Consume [0-9]*; the value is None if it exceeds 2**63, as in Go."""
    value = 0
    while pos < len(s) and _is_digit(s[pos]):
        value = value * 10 + ord(s[pos]) - ord("0")
        if value > _LIMIT:
            return None, pos
        pos += 1
    return value, pos


def _leading_fraction(s: str, pos: int) -> tuple[int, int, int]:
    """Consume [0-9]* after a '.'; returns (digits value, 10**used digits, new pos).

    Like Go, digits past int64 precision are consumed but ignored. (Go also stops
    when one more digit would pass 2**63; that only ever drops a 19th digit that the
    float64 scaling cannot see, so it is left out.)
    """
    value, scale = 0, 1
    while pos < len(s) and _is_digit(s[pos]):
        # Once past the bound the value stops changing, so every later digit is skipped.
        if value <= (_LIMIT - 1) // 10:
            value, scale = value * 10 + ord(s[pos]) - ord("0"), scale * 10
        pos += 1
    return value, scale, pos


def _term(s: str, pos: int, text: str) -> tuple[int, int]:
    """Parse one `number unit` term at `pos`; returns (nanoseconds, new pos)."""
    invalid = DurationError(f"time: invalid duration {_go_quote(text)}")
    start = pos
    whole, pos = _leading_int(s, pos)
    if whole is None:
        raise invalid
    has_digits = pos > start
    fraction, scale = 0, 1
    if pos < len(s) and s[pos] == ".":
        fraction_start = pos + 1
        fraction, scale, pos = _leading_fraction(s, fraction_start)
        has_digits = has_digits or pos > fraction_start
    if not has_digits:  # ".", "-.s", a sign alone, or a non-digit where a number belongs
        raise invalid

    unit_start = pos
    while pos < len(s) and s[pos] != "." and not _is_digit(s[pos]):
        pos += 1
    if pos == unit_start:
        raise DurationError(f"time: missing unit in duration {_go_quote(text)}")
    unit_text = s[unit_start:pos]
    unit = _UNITS.get(unit_text)
    if unit is None:
        raise DurationError(
            f"time: unknown unit {_go_quote(unit_text)} in duration {_go_quote(text)}"
        )

    # Go also checks whole*unit alone, to dodge uint64 wrap-around; Python ints cannot wrap.
    nanos = whole * unit
    if fraction:
        # Go scales the fraction through float64 (its own tests pin "0.3333333333333333333h"
        # to exactly 20m, where exact arithmetic gives 1ns less); match it bit for bit.
        nanos += int(float(fraction) * (float(unit) / float(scale)))
    if nanos > _LIMIT:
        raise invalid
    return nanos, pos


def parse_go_duration_ns(text: str) -> int:
    """Parse a Go duration into integer nanoseconds (within int64)."""
    if len(text) > MAX_DURATION_LENGTH:
        raise DurationError(
            f"time: invalid duration (longer than {MAX_DURATION_LENGTH} characters)"
        )
    s = text
    negative = False
    if s[:1] in ("-", "+"):
        negative = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise DurationError(f"time: invalid duration {_go_quote(text)}")

    total = 0
    pos = 0
    while pos < len(s):
        nanos, pos = _term(s, pos, text)
        total += nanos
        if total > _LIMIT:
            raise DurationError(f"time: invalid duration {_go_quote(text)}")
    if negative:
        return -total
    if total > _LIMIT - 1:
        raise DurationError(f"time: invalid duration {_go_quote(text)}")
    return total


def parse_go_duration(text: str) -> datetime.timedelta:
    """Parse a Go duration; sub-microsecond remainders are dropped (toward zero)."""
    nanos = parse_go_duration_ns(text)
    micros = abs(nanos) // 1000
    return datetime.timedelta(microseconds=-micros if nanos < 0 else micros)
