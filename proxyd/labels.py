"""Label selectors, as Teleport matches ``app_labels``: every key must match, any value may.

A value is an exact string, ``"*"`` (any value, the label must exist) or a ``^…$`` regular
expression. The pair ``"*" = "*"`` selects everything, including apps without labels. The
same matching serves role claim matchers later (issue 5).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

WILDCARD = "*"


class SelectorError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class ValueMatcher:
    exact: frozenset[str]
    any_value: bool
    patterns: tuple[re.Pattern[str], ...]

    def matches(self, value: str) -> bool:
        if self.any_value or value in self.exact:
            return True
        return any(p.fullmatch(value) for p in self.patterns)


@dataclass(frozen=True, slots=True)
class LabelSelector:
    terms: tuple[tuple[str, ValueMatcher], ...]
    match_all: bool = False

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.match_all:
            return True
        if not self.terms:
            return False
        for key, matcher in self.terms:
            value = labels.get(key)
            if value is None or not matcher.matches(value):
                return False
        return True


def parse_value_matcher(values: object, where: str) -> ValueMatcher:
    items = values if isinstance(values, list) else [values]
    if not items:
        raise SelectorError(f"{where}: needs at least one value")
    exact: set[str] = set()
    patterns: list[re.Pattern[str]] = []
    any_value = False
    for item in items:
        if not isinstance(item, str):
            raise SelectorError(f"{where}: values must be strings")
        if item == WILDCARD:
            any_value = True
        elif item.startswith("^") and item.endswith("$") and len(item) >= 2:
            try:
                patterns.append(re.compile(item))
            except re.error as exc:
                raise SelectorError(f"{where}: bad regular expression {item!r}: {exc}") from None
        else:
            exact.add(item)
    return ValueMatcher(frozenset(exact), any_value, tuple(patterns))


def parse_selector(spec: Mapping[str, object]) -> LabelSelector:
    terms: list[tuple[str, ValueMatcher]] = []
    match_all = False
    for key, values in spec.items():
        if key == WILDCARD:
            # Teleport's validateLabel: a wildcard key only goes with a wildcard value.
            if values != WILDCARD and values != [WILDCARD]:
                raise SelectorError('label key "*" may only be used with value "*"')
            match_all = True
            continue
        terms.append((str(key), parse_value_matcher(values, f"label {key!r}")))
    return LabelSelector(tuple(sorted(terms, key=lambda t: t[0])), match_all)
