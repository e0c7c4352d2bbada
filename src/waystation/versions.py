"""Box versions and version constraints, with the semantics of hashicorp/go-version.

Vagrant's Go side resolves box versions with go-version, so a constraint here must
select the versions it selects there. Where go-version is not self-consistent we
keep a consistent total order instead (Python's sorting, `max` and hashing need
one); each such place says so.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

__all__ = [
    "MAX_CONSTRAINT_LENGTH",
    "MAX_VERSION_LENGTH",
    "Constraint",
    "Constraints",
    "Version",
    "VersionError",
    "highest_matching",
    "parse_constraints",
    "parse_version",
]

# Both come from the network: bound the work a single value can cause.
MAX_VERSION_LENGTH = 256
MAX_CONSTRAINT_LENGTH = 1024

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

_IDENT = r"[0-9A-Za-z~-]+"
_DOTTED = rf"{_IDENT}(?:\.{_IDENT})*"
# Explicit ASCII classes: `\d` would accept other scripts' digits. A prerelease that
# starts with a letter, '-' or '~' may omit its '-' ("1.0beta"), as in go-version.
_VERSION_RE = re.compile(
    r"v?(?P<segments>[0-9]+(?:\.[0-9]+)*)"
    rf"(?:-(?P<pre>{_DOTTED})|(?P<bare_pre>[A-Za-z~-][0-9A-Za-z~-]*(?:\.{_IDENT})*))?"
    rf"(?:\+(?P<meta>{_DOTTED}))?"
)
# Go's `\s` is exactly these five; Python's str.strip() would take Unicode spaces too.
_WS = " \t\n\f\r"
_CONSTRAINT_RE = re.compile(
    rf"[{_WS}]*(?P<op>~>|>=|<=|!=|>|<|=)?[{_WS}]*(?P<version>[^{_WS}]+)[{_WS}]*"
)
# What Go's strconv.ParseInt(part, 10, 64) accepts from the prerelease alphabet.
_NUMERIC_PART = re.compile(r"-?[0-9]+")

Operator = Literal["=", "!=", ">", "<", ">=", "<=", "~>"]
_OPERATORS: dict[str, Operator] = {
    "": "=",
    "=": "=",
    "!=": "!=",
    ">": ">",
    "<": "<",
    ">=": ">=",
    "<=": "<=",
    "~>": "~>",
}

# (kind, number, text): numeric identifiers are kind 0, so they sort before others.
_PartKey = tuple[int, int, str]
_SortKey = tuple[tuple[int, ...], int, tuple[_PartKey, ...]]


class VersionError(ValueError):
    """A version or constraint string is malformed."""


class _SegmentOverflowError(VersionError):
    pass


def _quote(text: str) -> str:
    # ASCII-only escaping keeps NULs and control characters out of logs.
    return json.dumps(text, ensure_ascii=True)


def _part_key(part: str) -> _PartKey:
    if _NUMERIC_PART.fullmatch(part):
        number = int(part)
        if _INT64_MIN <= number <= _INT64_MAX:
            return (0, number, "")
    # Out-of-range digit strings fail ParseInt in go-version too, so they compare as text.
    return (1, 0, part)


@dataclass(frozen=True, order=False, eq=False)
class Version:
    """A parsed version; build one with `Version.parse`.

    Ordering: numeric segments with missing ones taken as 0, then a release above
    any of its prereleases, then prerelease identifiers pairwise (numeric before
    alphanumeric). Build metadata is ignored. Two departures from go-version, which
    is intransitive in both places: a shorter prerelease that is a prefix of a longer
    one sorts first ("a" < "a.b"; go-version puts "a" after "a.b" but before "a.1"),
    and zero-valued extra segments never mask a prerelease (go-version says
    "1.0.0.0-beta" equals "1.0.0").
    """

    original: str
    segments: tuple[int, ...]
    prerelease: str = ""
    metadata: str = ""

    @classmethod
    def parse(cls, text: str) -> Version:
        if len(text) > MAX_VERSION_LENGTH:
            raise VersionError(f"malformed version: longer than {MAX_VERSION_LENGTH} characters")
        match = _VERSION_RE.fullmatch(text)
        if match is None:
            raise VersionError(f"malformed version: {_quote(text)}")
        segments = tuple(int(s) for s in match["segments"].split("."))
        if any(s > _INT64_MAX for s in segments):
            raise _SegmentOverflowError(
                f"malformed version: {_quote(text)}: segment exceeds 64 bits"
            )
        prerelease = match["pre"] or match["bare_pre"] or ""
        return cls(text, segments, prerelease, match["meta"] or "")

    @cached_property
    def _padded(self) -> tuple[int, ...]:
        # go-version pads to MAJOR.MINOR.PATCH and no further; prerelease matching uses it.
        return self.segments + (0,) * (3 - len(self.segments))

    @cached_property
    def _key(self) -> _SortKey:
        trimmed = list(self.segments)
        while trimmed and trimmed[-1] == 0:
            trimmed.pop()
        if not self.prerelease:
            return (tuple(trimmed), 1, ())
        parts = tuple(_part_key(p) for p in self.prerelease.split("."))
        return (tuple(trimmed), 0, parts)

    def __str__(self) -> str:
        return self.original

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key == other._key

    def __lt__(self, other: Version) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key < other._key

    def __le__(self, other: Version) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key <= other._key

    def __gt__(self, other: Version) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key > other._key

    def __ge__(self, other: Version) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key >= other._key


def parse_version(text: str) -> Version:
    return Version.parse(text)


def _prerelease_allowed(v: Version, c: Version) -> bool:
    # A prerelease only ever satisfies an ordering constraint that names a
    # prerelease of the very same MAJOR.MINOR.PATCH.
    if not v.prerelease:
        return True
    return bool(c.prerelease) and v._padded == c._padded


def _pessimistic(v: Version, c: Version) -> bool:
    if not _prerelease_allowed(v, c) or (c.prerelease and not v.prerelease):
        return False
    if v < c:
        return False
    # go-version fixes len-1 written segments, so its "~> 1" has no upper bound
    # (hashicorp/go-version#162). We fix at least the major: "~> 1" is "< 2", as in RubyGems.
    fixed = max(len(c.segments) - 1, 1)
    return all(_segment(v, i) == _segment(c, i) for i in range(fixed))


def _segment(v: Version, index: int) -> int:
    return v.segments[index] if index < len(v.segments) else 0


@dataclass(frozen=True)
class Constraint:
    """One `operator version` term; a bare version means `=`."""

    operator: Operator
    version: Version

    def check(self, v: Version) -> bool:
        c = self.version
        op = self.operator
        # `=` and `!=` skip the prerelease rule in go-version, so `!= 1.1` admits 2.0-beta.
        if op == "=":
            return v == c
        if op == "!=":
            return v != c
        if op == "~>":
            return _pessimistic(v, c)
        if not _prerelease_allowed(v, c):
            return False
        if op == ">":
            return v > c
        if op == "<":
            return v < c
        if op == ">=":
            return v >= c
        return v <= c

    def __str__(self) -> str:
        return f"{self.operator} {self.version}"


@dataclass(frozen=True)
class Constraints:
    """Comma-separated constraints that must all hold; blank text allows any version."""

    original: str
    terms: tuple[Constraint, ...]

    @classmethod
    def parse(cls, text: str) -> Constraints:
        if len(text) > MAX_CONSTRAINT_LENGTH:
            raise VersionError(
                f"malformed constraint: longer than {MAX_CONSTRAINT_LENGTH} characters"
            )
        # go-version rejects "", but an unset box_version has to mean "any".
        if not text.strip(_WS):
            return cls(text, ())
        return cls(text, tuple(_parse_term(piece) for piece in text.split(",")))

    def check(self, v: Version) -> bool:
        return all(term.check(v) for term in self.terms)

    def __str__(self) -> str:
        return self.original


def parse_constraints(text: str) -> Constraints:
    return Constraints.parse(text)


def _parse_term(piece: str) -> Constraint:
    shown = _quote(piece.strip(_WS))
    match = _CONSTRAINT_RE.fullmatch(piece)
    if match is None:
        raise VersionError(f"malformed constraint: {shown}")
    try:
        version = Version.parse(match["version"])
    except _SegmentOverflowError as exc:
        raise VersionError(f"malformed constraint: {shown}: segment exceeds 64 bits") from exc
    except VersionError as exc:
        raise VersionError(f"malformed constraint: {shown}") from exc
    return Constraint(_OPERATORS[match["op"] or ""], version)


def highest_matching(versions: Iterable[str], constraint: str) -> str | None:
    """The highest version that parses and satisfies `constraint`, as given.

    Unparsable versions are skipped (stored data must not break resolution); a
    malformed constraint raises. Of versions that compare equal ("1.0", "1.0.0")
    the first one seen wins.
    """
    constraints = Constraints.parse(constraint)
    best: Version | None = None
    for text in versions:
        try:
            candidate = Version.parse(text)
        except VersionError:
            continue
        if constraints.check(candidate) and (best is None or candidate > best):
            best = candidate
    return None if best is None else best.original
