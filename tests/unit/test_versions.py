"""Version parsing, ordering and constraints with go-version semantics."""

from __future__ import annotations

import itertools
import time

import pytest

from waystation.versions import (
    MAX_CONSTRAINT_LENGTH,
    MAX_VERSION_LENGTH,
    Constraints,
    Version,
    VersionError,
    highest_matching,
    parse_constraints,
    parse_version,
)

INT64_MAX = 2**63 - 1


def v(text: str) -> Version:
    return Version.parse(text)


@pytest.mark.parametrize(
    ("text", "segments", "prerelease", "metadata"),
    [
        ("1", (1,), "", ""),
        ("1.2", (1, 2), "", ""),
        ("1.2.3", (1, 2, 3), "", ""),
        ("1.2.3.4.5.6", (1, 2, 3, 4, 5, 6), "", ""),
        ("v1.2.3", (1, 2, 3), "", ""),
        ("01.002.0003", (1, 2, 3), "", ""),
        ("1.2.3-beta", (1, 2, 3), "beta", ""),
        ("1.2.3-beta.1", (1, 2, 3), "beta.1", ""),
        ("1.2.3-1", (1, 2, 3), "1", ""),
        ("1.2.3-rc-1", (1, 2, 3), "rc-1", ""),
        ("1.2.3+build.5", (1, 2, 3), "", "build.5"),
        ("1.2.3-beta+exp.sha.5114f85", (1, 2, 3), "beta", "exp.sha.5114f85"),
        ("1.0beta", (1, 0), "beta", ""),  # go-version: '-' optional before a letter
        ("1.0~rc1", (1, 0), "~rc1", ""),
        ("1.0.0-", (1, 0, 0), "-", ""),  # a lone '-' is itself a prerelease
        ("1.0--x", (1, 0), "-x", ""),
        ("1.2.3+meta-data~x", (1, 2, 3), "", "meta-data~x"),
        (f"{INT64_MAX}", (INT64_MAX,), "", ""),
        ("0" * 250 + "7", (7,), "", ""),
    ],
)
def test_parse_valid(text: str, segments: tuple[int, ...], prerelease: str, metadata: str) -> None:
    parsed = Version.parse(text)
    assert parsed.segments == segments
    assert parsed.prerelease == prerelease
    assert parsed.metadata == metadata
    assert str(parsed) == text
    assert parse_version(text) == parsed


@pytest.mark.parametrize(
    "text",
    [
        "",
        "v",
        "1.x",
        "x.1",
        ".1",
        "1.",
        "1..2",
        "V1.0",
        "vv1.0",
        " 1.0",
        "1.0 ",
        "1. 0",
        "1.0\n",
        "1.0\x00",
        "\x001.0",
        "1.0-beta!",
        "1.0-beta..1",
        "1.0-beta.",
        "1.0+",
        "1.0+a+b",
        "1.0-1_0",
        "=1.0",
        ">=1.0",
        "1,0",
        "-1.0",
        "\u0661.0",  # ARABIC-INDIC DIGIT ONE
        "1.\uff10",  # FULLWIDTH DIGIT ZERO
        "1.0-b\u00e9ta",
        "1.0\u00a0",
    ],
)
def test_parse_malformed(text: str) -> None:
    with pytest.raises(VersionError) as info:
        Version.parse(text)
    assert str(info.value).startswith("malformed version: ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1.x", 'malformed version: "1.x"'),
        ("", 'malformed version: ""'),
        ("1\x00", 'malformed version: "1\\u0000"'),
        ('1"2', 'malformed version: "1\\"2"'),
        ("\u0661", 'malformed version: "\\u0661"'),
        (
            f"1.{INT64_MAX + 1}",
            f'malformed version: "1.{INT64_MAX + 1}": segment exceeds 64 bits',
        ),
        ("1" * 40, f'malformed version: "{"1" * 40}": segment exceeds 64 bits'),
    ],
)
def test_malformed_version_message(text: str, message: str) -> None:
    with pytest.raises(VersionError) as info:
        Version.parse(text)
    assert str(info.value) == message


def test_version_error_is_value_error() -> None:
    with pytest.raises(ValueError, match="malformed version"):
        Version.parse("nope")


def test_length_cap_is_inclusive() -> None:
    at_limit = "1." + "0" * (MAX_VERSION_LENGTH - 2)
    assert len(at_limit) == MAX_VERSION_LENGTH
    assert Version.parse(at_limit).segments == (1, 0)
    with pytest.raises(VersionError, match="longer than 256 characters"):
        Version.parse(at_limit + "0")


@pytest.mark.parametrize(
    "text",
    [
        "1" * 10_000,
        "1." * 5_000,
        "1.0-" + "a." * 5_000,
        "\x00" * 10_000,
        "\u0661" * 10_000,
    ],
)
def test_huge_input_rejected_without_echo(text: str) -> None:
    with pytest.raises(VersionError) as info:
        Version.parse(text)
    assert len(str(info.value)) < 100


@pytest.mark.parametrize(
    "text",
    [
        "1." * 127 + "x",
        "1.0-" + "a-" * 125 + "!",
        "1.0-" + "0" * 250 + "!",
        "1" + "-" * 254 + "!",
    ],
)
def test_near_limit_hostile_input_is_fast(text: str) -> None:
    assert len(text) <= MAX_VERSION_LENGTH
    started = time.perf_counter()
    with pytest.raises(VersionError):
        Version.parse(text)
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize(
    ("low", "high"),
    [
        ("1.0.0", "1.0.1"),
        ("1.0.9", "1.0.10"),  # numeric, not lexical
        ("1.9", "1.10"),
        ("1.2", "1.2.0.1"),
        ("1.2.99", "1.3"),
        ("0.9.9.9.9", "1"),
        ("1.0.0-beta", "1.0.0"),
        ("1.0-beta", "1.0"),
        ("1.0.0-alpha", "1.0.0-beta"),
        ("1.0.0-beta.2", "1.0.0-beta.11"),  # numeric identifiers compare as numbers
        ("1.0.0-1", "1.0.0-alpha"),  # numeric before alphanumeric
        ("1.0.0-2", "1.0.0-10"),
        ("1.0.0-rc.1", "1.0.0-rc.a"),
        ("1.0.0-A", "1.0.0-a"),  # byte order: upper case first
        ("1.0.0-a", "1.0.0-a.1"),
        ("1.0.0-a", "1.0.0-a.b"),  # go-version disagrees here (intransitive); see module doc
        ("1.0.0--1", "1.0.0-0"),  # "-1" is numeric to strconv.ParseInt
        ("1.0.0-99999999999999999999", "1.0.0-a"),  # out of int64: compared as text
        ("1.0.0-9223372036854775807", "1.0.0-9223372036854775808"),
        ("1.0.0-100000000000000000000", "1.0.0-99999999999999999999"),  # as text, not numbers
        ("1.0.0--9223372036854775808", "1.0.0--9223372036854775809"),  # below int64: text
        ("1.0.0.0-beta", "1.0.0"),  # go-version calls these equal; we keep the order total
        ("1.0.0-rc.1", "1.0.1-alpha"),
        ("9223372036854775806", "9223372036854775807"),
    ],
)
def test_ordering(low: str, high: str) -> None:
    a, b = v(low), v(high)
    assert a < b
    assert a <= b
    assert b > a
    assert b >= a
    assert a != b
    assert not a > b
    assert not b < a
    assert (a == b) is False


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("1", "1.0"),
        ("1.0", "1.0.0"),
        ("1.0.0", "1.0.0.0.0"),
        ("v1.0", "1.0.0"),
        ("01.0", "1.0"),
        ("1.0.0+a", "1.0.0+b"),  # metadata ignored
        ("1.0.0-beta+a", "1.0.0-beta"),
        ("1.0-beta", "1.0.0-beta"),
        ("1.0.0-rc.01", "1.0.0-rc.1"),
        ("1.0beta", "1.0-beta"),
    ],
)
def test_equal_versions_hash_alike(left: str, right: str) -> None:
    a, b = v(left), v(right)
    assert a == b
    assert a <= b
    assert a >= b
    assert not a < b
    assert not a > b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert str(a) == left
    assert str(b) == right


def test_comparison_with_other_types() -> None:
    one = v("1.0")
    text: object = "1.0"
    assert one != text
    assert text != one
    with pytest.raises(TypeError):
        _ = one < "1.0"  # type: ignore[operator]
    with pytest.raises(TypeError):
        _ = one >= 1  # type: ignore[operator]


_CORPUS = [
    "0",
    "0.0.1",
    "1",
    "1.0.0.0-beta",
    "1.0.0-1",
    "1.0.0-2",
    "1.0.0-10",
    "1.0.0-a",
    "1.0.0-a.1",
    "1.0.0-a.b",
    "1.0.0-a.b.1",
    "1.0.0-b",
    "1.0.0--1",
    "1.0.0-99999999999999999999",
    "1.0",
    "1.0.0+meta",
    "1.0.0.1",
    "1.0.1-rc.1",
    "1.0.1",
    "1.2",
    "1.10",
    "2.0.0-alpha",
    "2",
]


def test_order_is_total_and_transitive() -> None:
    versions = [v(t) for t in _CORPUS]
    for a, b in itertools.product(versions, repeat=2):
        assert sum([a < b, a == b, a > b]) == 1, (a, b)
        if a == b:
            assert hash(a) == hash(b)
    for a, b, c in itertools.product(versions, repeat=3):
        if a <= b and b <= c:
            assert a <= c, (a, b, c)


def test_sorting_matches_expected_sequence() -> None:
    shuffled = ["1.10", "1.0.0", "1.0.0-rc.1", "1.2", "0.9", "1.0.0-beta", "1.0.0-rc.10"]
    assert [str(x) for x in sorted(v(t) for t in shuffled)] == [
        "0.9",
        "1.0.0-beta",
        "1.0.0-rc.1",
        "1.0.0-rc.10",
        "1.0.0",
        "1.2",
        "1.10",
    ]


# Cases from go-version's own constraint tests plus the brief, as facts.
@pytest.mark.parametrize(
    ("constraint", "version", "expected"),
    [
        (">= 1.0, < 1.2", "1.1.5", True),
        ("< 1.0, < 1.2", "1.1.5", False),
        ("= 1.0", "1.1.5", False),
        ("= 1.0", "1.0.0", True),
        ("1.0", "1.0.0", True),
        ("1.0", "1.0.1", False),
        ("= 1.0.0", "1.0.0-beta", False),
        ("= 1.0.0-beta", "1.0.0-beta", True),
        ("= 1.0.0-beta", "1.0.0-beta+m", True),
        ("!= 1.1", "1.1.0", False),
        ("!= 1.1", "1.1.1", True),
        ("!= 1.1", "2.0.0-beta", True),  # != skips the prerelease rule, as in go-version
        (">1", "1.0.1", True),
        (">1", "1", False),
        ("<=2.0.1", "2.0.1", True),
        ("<=2.0.1", "2.0.2", False),
        ("~> 1.0", "2.0", False),
        ("~> 1.0", "1.1", True),
        ("~> 1.0", "1.2.3", True),
        ("~> 1.2", "1.1.9", False),
        ("~> 1.2", "1.9.9", True),
        ("~> 1.0.0", "1.2.3", False),
        ("~> 1.0.0", "1.0.7", True),
        ("~> 1.0.0", "1.1.0", False),
        ("~> 1.2.3", "1.2.2", False),
        ("~> 1.2.3", "1.2.99", True),
        ("~> 1.2.3", "1.3.0", False),
        ("~> 1.0.7", "1.0.4", False),
        ("~> 1.0.7", "1.0.7", True),
        ("~> 1.0.7", "1.0.8", True),
        ("~> 1.0.7", "1.0.7.5", True),
        ("~> 1.0.7", "1.0.6.99", False),
        ("~> 1.0.7", "1.0.8.0", True),
        ("~> 1.0.9.5", "1.0.9.5", True),
        ("~> 1.0.9.5", "1.0.9.4", False),
        ("~> 1.0.9.5", "1.0.9.6", True),
        ("~> 1.0.9.5", "1.0.9.5.0", True),
        ("~> 1.0.9.5", "1.0.9.5.1", True),
        ("~> 1.0.9.5", "1.0.10", False),
        ("~> 1", "1.0", True),
        ("~> 1", "1.9.9", True),
        ("~> 1", "2.0", False),  # go-version would say True (its issue #162)
        ("~> 1", "0.9", False),
        ("~> 0", "0.5", True),
        ("~> 0", "1.0", False),
        ("~> 2.0", "2.1.0-beta", False),
        ("~> 2.1.0-a", "2.2.0", False),
        ("~> 2.1.0-a", "2.1.0", False),
        ("~> 2.1.0-a", "2.1.0-beta", True),
        ("~> 2.1.0-a", "2.1.0-0", False),  # numeric prerelease sorts below "a"
        ("~> 2.1.0-a", "2.2.0-alpha", False),
        ("> 2.0", "2.1.0-beta", False),
        (">= 2.1.0-a", "2.1.0-beta", True),
        (">= 2.1.0-a", "2.1.1-beta", False),
        (">= 2.0.0", "2.1.0-beta", False),
        (">= 2.1.0-a", "2.1.1", True),
        (">= 2.1.0-a", "2.1.0", True),
        ("<= 2.1.0-a", "2.0.0", True),
        ("< 2.1.0-b", "2.1.0-a", True),
        ("< 2.1.0", "2.1.0-a", False),  # no prerelease in the constraint
        (">= 2.1-a", "2.1.0-b", True),  # same MAJOR.MINOR.PATCH once padded
        (">= 1.0, < 2.0, != 1.5", "1.5.0", False),
        (">= 1.0, < 2.0, != 1.5", "1.5.1", True),
        ("= v1.0", "1.0.0", True),
        ("= 1.0+abc", "1.0.0+xyz", True),
    ],
)
def test_constraint_check(constraint: str, version: str, expected: bool) -> None:
    assert Constraints.parse(constraint).check(v(version)) is expected


@pytest.mark.parametrize(
    "constraint",
    [
        ">=1.0,<2.0",
        "  >=   1.0 ,  <  2.0  ",
        "\t>=\t1.0\t,\n<\r2.0\f",
        ">= 1.0, < 2.0",
    ],
)
def test_constraint_whitespace_tolerance(constraint: str) -> None:
    parsed = Constraints.parse(constraint)
    assert [(t.operator, str(t.version)) for t in parsed.terms] == [(">=", "1.0"), ("<", "2.0")]
    assert str(parsed) == constraint


@pytest.mark.parametrize(
    ("constraint", "operator"),
    [
        ("1.0.0", "="),
        ("= 1.0.0", "="),
        ("!= 1.0.0", "!="),
        ("> 1.0.0", ">"),
        ("< 1.0.0", "<"),
        (">= 1.0.0", ">="),
        ("<= 1.0.0", "<="),
        ("~> 1.0.0", "~>"),
    ],
)
def test_constraint_operators(constraint: str, operator: str) -> None:
    (term,) = parse_constraints(constraint).terms
    assert term.operator == operator
    assert term.version == v("1.0.0")
    assert str(term) == f"{operator} 1.0.0"


@pytest.mark.parametrize("blank", ["", " ", "\t\n", "  \r\f "])
@pytest.mark.parametrize("version", ["0", "1.0", "2.0.0-beta", "9223372036854775807.1+x"])
def test_blank_constraint_allows_any(blank: str, version: str) -> None:
    parsed = Constraints.parse(blank)
    assert parsed.terms == ()
    assert parsed.check(v(version))


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        (">>1", 'malformed constraint: ">>1"'),
        ("> = 1", 'malformed constraint: "> = 1"'),
        ("=>1", 'malformed constraint: "=>1"'),
        ("=<1", 'malformed constraint: "=<1"'),
        ("~1", 'malformed constraint: "~1"'),
        ("^1.0", 'malformed constraint: "^1.0"'),
        ("==1.0", 'malformed constraint: "==1.0"'),
        (">=", 'malformed constraint: ">="'),
        (">= 1.x", 'malformed constraint: ">= 1.x"'),
        (">= 1.0 <2", 'malformed constraint: ">= 1.0 <2"'),
        (">= 1.0 beta", 'malformed constraint: ">= 1.0 beta"'),
        (">= 1.0,", 'malformed constraint: ""'),
        (", >= 1.0", 'malformed constraint: ""'),
        (">= 1.0,, < 2", 'malformed constraint: ""'),
        (">= 1.0; < 2", 'malformed constraint: ">= 1.0; < 2"'),
        ("\v>= 1.0", 'malformed constraint: "\\u000b>= 1.0"'),  # \v is not Go's \s
        ("\u00a0>= 1.0", 'malformed constraint: "\\u00a0>= 1.0"'),
        (">= \u0661", 'malformed constraint: ">= \\u0661"'),
        (">= 1\x00", 'malformed constraint: ">= 1\\u0000"'),
        ("\u3000", 'malformed constraint: "\\u3000"'),
        (
            ">= 99999999999999999999",
            'malformed constraint: ">= 99999999999999999999": segment exceeds 64 bits',
        ),
        ("1.0, 2.0, x", 'malformed constraint: "x"'),
    ],
)
def test_malformed_constraint(constraint: str, message: str) -> None:
    with pytest.raises(VersionError) as info:
        Constraints.parse(constraint)
    assert str(info.value) == message


def test_constraint_length_cap() -> None:
    term = ">= 1.0, "
    at_limit = (term * (MAX_CONSTRAINT_LENGTH // len(term)))[:-2]
    at_limit += " " * (MAX_CONSTRAINT_LENGTH - len(at_limit))
    assert len(at_limit) == MAX_CONSTRAINT_LENGTH
    assert Constraints.parse(at_limit).check(v("1.0"))
    with pytest.raises(VersionError, match="malformed constraint: longer than 1024"):
        Constraints.parse(at_limit + " ")


@pytest.mark.parametrize("text", [">" * 10_000, "1.0," * 2_500, "\x00" * 10_240])
def test_huge_constraint_rejected_without_echo(text: str) -> None:
    with pytest.raises(VersionError) as info:
        Constraints.parse(text)
    assert len(str(info.value)) < 100


@pytest.mark.parametrize(
    ("versions", "constraint", "expected"),
    [
        (["1.0.0", "1.2.0", "1.10.0", "2.0.0"], "~> 1.0", "1.10.0"),
        (["1.0.0", "1.2.0", "1.10.0", "2.0.0"], "", "2.0.0"),
        (["1.0.0", "2.0.0-beta"], "", "2.0.0-beta"),  # blank admits prereleases
        (["1.0.0", "2.0.0-beta"], ">= 1.0", "1.0.0"),
        (["2.0.0-beta", "2.0.0-rc.1", "1.0"], ">= 2.0.0-alpha", "2.0.0-rc.1"),
        (["garbage", "1.x", "", "1.5", " 2.0", "v1.6"], ">= 1.0", "v1.6"),
        (["1.0", "1.0.0", "1"], "= 1", "1.0"),  # first of equals wins
        (["1.0.0", "1.0"], "= 1", "1.0.0"),
        (["1.0", "1.1"], "> 5", None),
        ([], "", None),
        (["x" * 10_000, "1" * 10_000, "\x00", "\u0661.0", "3"], "", "3"),
        (["99999999999999999999", "5"], "", "5"),
        (["1.2.3", "1.2.10", "1.3.0"], "~> 1.2.3", "1.2.10"),
    ],
)
def test_highest_matching(versions: list[str], constraint: str, expected: str | None) -> None:
    assert highest_matching(versions, constraint) == expected
    assert highest_matching(iter(versions), constraint) == expected


def test_highest_matching_rejects_malformed_constraint() -> None:
    with pytest.raises(VersionError, match=r'malformed constraint: ">>1"'):
        highest_matching(["1.0"], ">>1")


def test_version_is_immutable() -> None:
    parsed = v("1.0")
    with pytest.raises(AttributeError):
        parsed.original = "2.0"  # type: ignore[misc]
