"""Go time.ParseDuration parity."""

from __future__ import annotations

import datetime

import pytest

from waystation.durations import (
    MAX_DURATION_LENGTH,
    DurationError,
    parse_go_duration,
    parse_go_duration_ns,
)

NS = 1
US = 1_000
MS = 1_000_000
S = 1_000_000_000
M = 60 * S
H = 60 * M
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


@pytest.mark.parametrize(
    ("text", "nanos"),
    [
        ("0", 0),
        ("-0", 0),
        ("+0", 0),
        ("0s", 0),
        ("00s", 0),
        ("0.0s", 0),
        ("0h0m0s", 0),
        ("5s", 5 * S),
        ("30s", 30 * S),
        ("1478s", 1478 * S),
        ("-5s", -5 * S),
        ("+5s", 5 * S),
        ("-0s", 0),
        ("5.0s", 5 * S),
        ("5.6s", 5 * S + 600 * MS),
        ("5.s", 5 * S),
        (".5s", 500 * MS),
        ("1.0s", S),
        ("1.00s", S),
        ("1.004s", S + 4 * MS),
        ("1.0040s", S + 4 * MS),
        ("100.00100s", 100 * S + MS),
        ("10ns", 10 * NS),
        ("11us", 11 * US),
        ("12\u00b5s", 12 * US),  # MICRO SIGN
        ("12\u03bcs", 12 * US),  # GREEK SMALL LETTER MU
        ("13ms", 13 * MS),
        ("14s", 14 * S),
        ("15m", 15 * M),
        ("16h", 16 * H),
        ("300ms", 300 * MS),
        ("-1.5h", -(H + 30 * M)),
        ("2h45m", 2 * H + 45 * M),
        ("1h5m30.5s", H + 5 * M + 30 * S + 500 * MS),
        ("3h30m", 3 * H + 30 * M),
        ("10.5s4m", 4 * M + 10 * S + 500 * MS),
        ("-2m3.4s", -(2 * M + 3 * S + 400 * MS)),
        ("1h2m3s4ms5us6ns", H + 2 * M + 3 * S + 4 * MS + 5 * US + 6 * NS),
        ("39h9m14.425s", 39 * H + 9 * M + 14 * S + 425 * MS),
        ("1h1h", 2 * H),  # units may repeat and come in any order
        ("1s1h", H + S),
        ("52763797000ns", 52763797000),
        ("1.1ns", 1),  # sub-nanosecond fractions truncate
        ("0.9ns", 0),
        ("0000000000000000000000000001s", S),
        ("9007199254740993ns", (1 << 53) + 1),
        ("9223372036854775807ns", INT64_MAX),
        ("9223372036854775.807us", INT64_MAX),
        ("9223372036s854ms775us807ns", INT64_MAX),
        ("2562047h47m16.854775807s", INT64_MAX),
        ("-9223372036854775807ns", INT64_MIN + 1),
        ("-9223372036854775808ns", INT64_MIN),
        ("-9223372036854775.808us", INT64_MIN),
        ("-9223372036s854ms775us808ns", INT64_MIN),
        ("-2562047h47m16.854775808s", INT64_MIN),
        ("0.100000000000000000000h", 6 * M),
        # Go scales fractions through float64; exact arithmetic would give 1ns less.
        ("0.3333333333333333333h", 20 * M),
        # Digits past int64 precision are read but ignored (Go's leadingFraction).
        ("0.830103483285477580700h", 49 * M + 48 * S + 372539827),
        ("0." + "1" * 120 + "s", 111_111_111),
        # Here the ignored digits are visible: counting them all would round up.
        ("0.50171599999999993870048h", 1_806_177_599_999),
        ("0.92195755209055559159h", 3_319_047_187_526),
    ],
)
def test_parse_ns(text: str, nanos: int) -> None:
    assert parse_go_duration_ns(text) == nanos


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", datetime.timedelta(0)),
        ("1h", datetime.timedelta(hours=1)),
        ("-1.5h", datetime.timedelta(hours=-1.5)),
        ("2h45m", datetime.timedelta(hours=2, minutes=45)),
        ("300ms", datetime.timedelta(milliseconds=300)),
        ("1ns", datetime.timedelta(0)),
        ("999ns", datetime.timedelta(0)),
        ("-999ns", datetime.timedelta(0)),
        ("1000ns", datetime.timedelta(microseconds=1)),
        ("1999ns", datetime.timedelta(microseconds=1)),
        ("-1999ns", datetime.timedelta(microseconds=-1)),  # toward zero, not floor
        ("-1.5us", datetime.timedelta(microseconds=-1)),
        ("1.5us", datetime.timedelta(microseconds=1)),
        ("1h5m30.5s", datetime.timedelta(hours=1, minutes=5, seconds=30.5)),
        ("9223372036854775807ns", datetime.timedelta(microseconds=9223372036854775)),
        ("-9223372036854775808ns", datetime.timedelta(microseconds=-9223372036854775)),
    ],
)
def test_parse_timedelta(text: str, expected: datetime.timedelta) -> None:
    result = parse_go_duration(text)
    assert result == expected
    assert isinstance(result, datetime.timedelta)


def _invalid(text: str) -> str:
    return f"time: invalid duration {text}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", _invalid('""')),
        ("-", _invalid('"-"')),
        ("+", _invalid('"+"')),
        ("s", _invalid('"s"')),
        (".", _invalid('"."')),
        ("-.", _invalid('"-."')),
        (".s", _invalid('".s"')),
        ("+.s", _invalid('"+.s"')),
        ("--1s", _invalid('"--1s"')),
        ("+-1s", _invalid('"+-1s"')),
        (" 1s", _invalid('" 1s"')),
        ("1s.s", _invalid('"1s.s"')),
        ("x", _invalid('"x"')),
        ("\x00", _invalid('"\\x00"')),
        ("\u0661s", _invalid('"\\xd9\\xa1s"')),  # ARABIC-INDIC DIGIT ONE is no digit
        ("\uff11s", _invalid('"\\xef\\xbc\\x91s"')),  # FULLWIDTH DIGIT ONE
        ("3", 'time: missing unit in duration "3"'),
        ("1", 'time: missing unit in duration "1"'),
        ("-1", 'time: missing unit in duration "-1"'),
        ("00", 'time: missing unit in duration "00"'),
        ("0.0", 'time: missing unit in duration "0.0"'),
        ("1h2", 'time: missing unit in duration "1h2"'),
        ("1.5.5s", 'time: missing unit in duration "1.5.5s"'),
        ("1d", 'time: unknown unit "d" in duration "1d"'),
        ("1H", 'time: unknown unit "H" in duration "1H"'),
        ("1sec", 'time: unknown unit "sec" in duration "1sec"'),
        ("1e3s", 'time: unknown unit "e" in duration "1e3s"'),
        ("1 s", 'time: unknown unit " s" in duration "1 s"'),
        ("1s ", 'time: unknown unit "s " in duration "1s "'),
        ("1h-5m", 'time: unknown unit "h-" in duration "1h-5m"'),
        ("1\x00s", 'time: unknown unit "\\x00s" in duration "1\\x00s"'),
        ("1\u0661s", 'time: unknown unit "\\xd9\\xa1s" in duration "1\\xd9\\xa1s"'),
        ("1\u00b5", 'time: unknown unit "\\xc2\\xb5" in duration "1\\xc2\\xb5"'),
        ("1\ufffd", 'time: unknown unit "\\xef\\xbf\\xbd" in duration "1\\xef\\xbf\\xbd"'),
        ('1"s', 'time: unknown unit "\\"s" in duration "1\\"s"'),
        ("1\\s", 'time: unknown unit "\\\\s" in duration "1\\\\s"'),
        ("1\x7fs", 'time: unknown unit "\x7fs" in duration "1\x7fs"'),  # Go leaves DEL as is
        ("1\nh", 'time: unknown unit "\\x0ah" in duration "1\\x0ah"'),
        # overflow
        ("3000000h", _invalid('"3000000h"')),
        ("2562048h", _invalid('"2562048h"')),
        ("2562047.9h", _invalid('"2562047.9h"')),  # overflows only once the fraction is added
        ("9223372036854775808ns", _invalid('"9223372036854775808ns"')),
        ("9223372036854775.808us", _invalid('"9223372036854775.808us"')),
        ("9223372036854ms775us808ns", _invalid('"9223372036854ms775us808ns"')),
        ("2562047h47m16.854775808s", _invalid('"2562047h47m16.854775808s"')),
        ("9223372036854775807ns1ns", _invalid('"9223372036854775807ns1ns"')),
        ("-9223372036854775809ns", _invalid('"-9223372036854775809ns"')),
        ("-9223372036854775807ns2ns", _invalid('"-9223372036854775807ns2ns"')),
        ("99999999999999999999s", _invalid('"99999999999999999999s"')),
        ("18446744073709551616ns", _invalid('"18446744073709551616ns"')),
        ("1" * 128, _invalid(f'"{"1" * 128}"')),  # the number overflows before a unit is missed
    ],
)
def test_errors(text: str, message: str) -> None:
    with pytest.raises(DurationError) as info:
        parse_go_duration_ns(text)
    assert str(info.value) == message
    with pytest.raises(DurationError):
        parse_go_duration(text)


def test_duration_error_is_value_error() -> None:
    with pytest.raises(ValueError, match="time: invalid duration"):
        parse_go_duration("nope")


def test_length_cap_is_inclusive() -> None:
    at_limit = "1s" + "0s" * ((MAX_DURATION_LENGTH - 2) // 2)
    assert len(at_limit) == MAX_DURATION_LENGTH
    assert parse_go_duration_ns(at_limit) == S
    with pytest.raises(DurationError) as info:
        parse_go_duration_ns(at_limit + "0s")
    assert str(info.value) == "time: invalid duration (longer than 128 characters)"


@pytest.mark.parametrize(
    "text",
    [
        "1" * 10_240,
        "1s" * 5_000,
        "0." + "9" * 10_000 + "s",
        "\x00" * 10_240,
        "\u0661" * 10_240,
        "-" * 10_240,
    ],
)
def test_huge_input_rejected_without_echo(text: str) -> None:
    with pytest.raises(DurationError) as info:
        parse_go_duration(text)
    assert str(info.value) == "time: invalid duration (longer than 128 characters)"
