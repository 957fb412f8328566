"""Label selectors (proxyd.labels): every key must match, any listed value may."""

from __future__ import annotations

import re

import pytest

from proxyd.labels import SelectorError, parse_selector

PROD = {"env": "prod", "team": "payments"}
DEV = {"env": "dev", "team": "search"}
UNLABELLED: dict[str, str] = {}


def test_exact_value() -> None:
    sel = parse_selector({"env": "prod"})
    assert sel.matches(PROD)
    assert not sel.matches(DEV)
    assert not sel.matches({"env": "production"})  # no prefix matching
    assert not sel.matches({"env": "PROD"})  # case sensitive


def test_list_of_values_is_any_of() -> None:
    sel = parse_selector({"env": ["dev", "prod"]})
    assert sel.matches(PROD)
    assert sel.matches(DEV)
    assert not sel.matches({"env": "staging"})


def test_wildcard_value_requires_the_label() -> None:
    sel = parse_selector({"team": "*"})
    assert sel.matches(PROD)
    assert sel.matches({"team": ""})
    assert not sel.matches({"env": "prod"})
    assert not sel.matches(UNLABELLED)


def test_regex_must_match_the_whole_value() -> None:
    sel = parse_selector({"env": "^prod-[0-9]+$"})
    assert sel.matches({"env": "prod-1"})
    assert sel.matches({"env": "prod-42"})
    assert not sel.matches({"env": "prod-"})
    assert not sel.matches({"env": "xprod-1"})
    assert not sel.matches({"env": "prod-1x"})


def test_regex_alternation_is_still_a_full_match() -> None:
    # "^a|b$" would match "ab…" or "…b" with re.search; selectors use fullmatch.
    sel = parse_selector({"env": "^dev|prod$"})
    assert sel.matches({"env": "dev"})
    assert sel.matches({"env": "prod"})
    assert not sel.matches({"env": "devx"})
    assert not sel.matches({"env": "xprod"})


def test_regex_mixed_with_exact_values() -> None:
    sel = parse_selector({"env": ["staging", "^prod-.*$"]})
    assert sel.matches({"env": "staging"})
    assert sel.matches({"env": "prod-eu"})
    assert not sel.matches({"env": "dev"})


def test_dollar_or_caret_alone_is_an_exact_value() -> None:
    sel = parse_selector({"price": "$5", "tag": "^x"})
    assert sel.matches({"price": "$5", "tag": "^x"})
    assert not sel.matches({"price": "5", "tag": "x"})


def test_wildcard_pair_matches_everything_even_unlabelled() -> None:
    for spec in ({"*": "*"}, {"*": ["*"]}):
        sel = parse_selector(spec)
        assert sel.matches(UNLABELLED)
        assert sel.matches(PROD)


def test_missing_label_fails() -> None:
    sel = parse_selector({"region": "eu"})
    assert not sel.matches(PROD)
    assert sel.matches({**PROD, "region": "eu"})


def test_and_across_keys() -> None:
    sel = parse_selector({"env": "prod", "team": ["payments", "billing"]})
    assert sel.matches(PROD)
    assert sel.matches({"env": "prod", "team": "billing", "extra": "ignored"})
    assert not sel.matches({"env": "prod", "team": "search"})
    assert not sel.matches({"env": "dev", "team": "payments"})
    assert not sel.matches({"env": "prod"})


def test_empty_selector_matches_nothing() -> None:
    sel = parse_selector({})
    assert not sel.matches(UNLABELLED)
    assert not sel.matches(PROD)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"*": "prod"}, 'label key "*" may only be used with value "*"'),
        ({"*": ["*", "x"]}, 'label key "*" may only be used with value "*"'),
        ({"env": "^prod($"}, "bad regular expression"),
        ({"env": []}, "needs at least one value"),
        ({"env": 3}, "values must be strings"),
        ({"env": ["ok", 3]}, "values must be strings"),
    ],
)
def test_invalid_selectors(spec: dict[str, object], message: str) -> None:
    with pytest.raises(SelectorError, match=re.escape(message)):
        parse_selector(spec)
