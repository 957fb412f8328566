"""Configuration (proxyd.config): every problem at once, with its key path; config_dir; CLI."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from joserfc.jwk import ECKey, OKPKey

from proxyd.config import (
    ConfigError,
    Settings,
    load_app_auth_dir,
    load_settings,
    parse_app_auth_file,
    parse_duration,
    parse_settings,
    parse_size,
)
from tests.kit.issuer import TestIssuer, weak_rsa_key
from tests.kit.net import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "etc" / "proxyd" / "proxyd.toml"


def problems_of(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_settings(doc)
    assert str(exc.value) == "\n".join(exc.value.problems)
    return exc.value.problems


def auth_config(name: str = "corp", **jwt: Any) -> dict[str, Any]:
    return {
        "name": name,
        "app_labels": {"env": "prod"},
        "jwt": {
            "issuer": "https://idp.example.com",
            "audience": "proxyd",
            "jwks_url": "https://idp.example.com/jwks.json",
            **jwt,
        },
    }


def good_doc() -> dict[str, Any]:
    return {
        "server": {"listen": "127.0.0.1:8443", "public_url": "https://mcp.example.com/"},
        "apps": [
            {"name": "billing", "labels": {"env": "prod"}, "servers": ["http://10.0.0.1/mcp"]}
        ],
        "app_auth_configs": [auth_config()],
    }


def static_jwks(*, with_alg: bool = True) -> str:
    issuer = TestIssuer()
    issuer.add_key("r1", "RS256")
    return json.dumps(issuer.jwks(with_alg=with_alg))


# --- a valid document --------------------------------------------------------------------------


def test_good_document_parses_with_defaults() -> None:
    settings = parse_settings(good_doc())
    assert settings.server.listen_host == "127.0.0.1"
    assert settings.server.listen_port == 8443
    assert settings.server.public_url == "https://mcp.example.com"  # trailing slash dropped
    assert settings.apps[0].servers == ("http://10.0.0.1/mcp",)
    [config] = settings.app_auth_configs
    assert config.source == "main"
    assert config.jwt.username_claim == ("email",)
    assert config.jwt.audience == ("proxyd",)
    assert config.jwt.resource_audience is True
    assert config.jwt.required_scopes == ()
    assert config.jwt.max_token_age == 1800.0
    assert config.jwt.leeway == 60.0
    assert config.app_labels.matches({"env": "prod"})
    assert settings.sessions.max_ttl == 12 * 3600
    assert settings.identity.ttl == 300.0


def test_settings_are_immutable() -> None:
    settings = parse_settings(good_doc())
    with pytest.raises(AttributeError):
        settings.server.listen_port = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        settings.apps = ()  # type: ignore[misc]


def test_empty_document_is_valid() -> None:
    assert parse_settings({}) == Settings()


def test_static_jwks_as_string_or_inline_table() -> None:
    text = static_jwks()
    for value in (text, json.loads(text)):
        doc = good_doc()
        doc["app_auth_configs"] = [auth_config(jwks_url=None, static_jwks=value)]
        del doc["app_auth_configs"][0]["jwt"]["jwks_url"]
        [config] = parse_settings(doc).app_auth_configs
        assert config.jwt.static_jwks is not None
        assert json.loads(config.jwt.static_jwks) == json.loads(text)


def static_only(value: str, **jwt: Any) -> dict[str, Any]:
    doc = good_doc()
    config = auth_config(static_jwks=value, **jwt)
    del config["jwt"]["jwks_url"]
    doc["app_auth_configs"] = [config]
    return doc


def test_static_jwks_keys_without_alg_need_algorithms() -> None:
    no_alg = static_jwks(with_alg=False)
    [problem] = problems_of(static_only(no_alg))
    assert problem.startswith("app_auth_configs[0].jwt.static_jwks: JWKS has no usable signing key")
    # With `algorithms`, as the error message advises, the same keys are accepted.
    settings = parse_settings(static_only(no_alg, algorithms=["RS256"]))
    assert settings.app_auth_configs[0].jwt.algorithms == frozenset({"RS256"})


def test_static_jwks_filtered_to_nothing_by_algorithms_is_a_config_error() -> None:
    # An RS256 key with algorithms = ["ES256"]: caught by check-config, not at daemon start.
    [problem] = problems_of(static_only(static_jwks(), algorithms=["ES256"]))
    assert problem.startswith("app_auth_configs[0].jwt.static_jwks: JWKS has no usable signing key")


# --- static_jwks keys proxyd will not trust (RFC 7518 §3.3, §3.4) -------------------------------

TOO_SMALL = "RSA key of {bits} bits is too small (RFC 7518 §3.3 requires at least 2048)"


def jwks_with(*entries: dict[str, Any]) -> str:
    """A good RS256 key first, then ``entries``."""
    good = json.loads(static_jwks())["keys"]
    return json.dumps({"keys": [*good, *entries]})


def weak_entry(bits: int = 512, kid: str = "weak", **members: Any) -> dict[str, Any]:
    return {**weak_rsa_key(bits).as_dict(private=False), "kid": kid, "alg": "RS256", **members}


@pytest.mark.parametrize("bits", [512, 1024])
def test_static_jwks_weak_rsa_key_is_a_config_error_naming_the_key(bits: int) -> None:
    [problem] = problems_of(static_only(jwks_with(weak_entry(bits))))
    assert problem == (
        f"app_auth_configs[0].jwt.static_jwks.keys[1]: {TOO_SMALL.format(bits=bits)}"
    )
    # The whole key set is not echoed, and no key material is.
    assert weak_entry(bits)["n"] not in problem


def test_static_jwks_whose_only_key_is_weak_names_that_key() -> None:
    only = json.dumps({"keys": [weak_entry()]})
    for value in (only, json.loads(only)):  # JSON text or an inline table
        [problem] = problems_of(static_only(value))
        path = "app_auth_configs[0].jwt.static_jwks.keys[0]"
        assert problem == f"{path}: {TOO_SMALL.format(bits=512)}"


def test_static_jwks_every_rejected_key_is_reported() -> None:
    k1 = {**ECKey.generate_key("secp256k1").as_dict(private=False), "kid": "k1"}
    p256 = {**ECKey.generate_key("P-256").as_dict(private=False), "kid": "p", "alg": "ES384"}
    rsa_es = {**json.loads(static_jwks())["keys"][0], "kid": "r", "alg": "ES256"}
    x25519 = {**OKPKey.generate_key("X25519").as_dict(private=False), "kid": "x"}
    problems = problems_of(static_only(jwks_with(weak_entry(), k1, p256, rsa_es, x25519)))
    path = "app_auth_configs[0].jwt.static_jwks.keys"
    assert problems == [
        f"{path}[1]: {TOO_SMALL.format(bits=512)}",
        f"{path}[2]: EC curve 'secp256k1' is not allowed (RFC 7518 §3.4: P-256, P-384 or P-521)",
        f"{path}[3]: alg 'ES384' does not fit an EC P-256 key (it takes ES256)",
        f"{path}[4]: alg 'ES256' does not fit an RSA key "
        "(it takes RS256, RS384, RS512, PS256, PS384, PS512)",
        f"{path}[5]: OKP curve 'X25519' is not a signature curve (RFC 8037 §3.1: Ed25519 or Ed448)",
    ]


def test_static_jwks_keys_for_other_uses_are_not_errors() -> None:
    oct_key = {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}
    settings = parse_settings(static_only(jwks_with(weak_entry(use="enc"), oct_key)))
    assert settings.app_auth_configs[0].jwt.static_jwks is not None


def test_config_dir_file_with_weak_static_key_names_file_and_key(tmp_path: Path) -> None:
    jwks = json.dumps({"keys": [weak_entry()]})
    text = (
        'name = "weak"\napp_labels = { env = "prod" }\n[jwt]\n'
        f'issuer = "https://i"\naudience = "a"\nstatic_jwks = \'{jwks}\'\n'
    )
    path = tmp_path / "weak.toml"
    path.write_text(text)
    expected = f"{path}: jwt.static_jwks.keys[0]: {TOO_SMALL.format(bits=512)}"
    with pytest.raises(ConfigError) as exc:  # what the config_dir watcher calls
        parse_app_auth_file(path, text)
    assert exc.value.problems == [expected]
    assert load_app_auth_dir(str(tmp_path)) == ([], [expected])
    assert problems_of(with_dir(tmp_path)) == [expected]


# --- every problem at once, each with its key path ---------------------------------------------


def bad_doc() -> dict[str, Any]:
    return {
        "sever": {},
        "server": {
            "listn": "127.0.0.1:1",
            "listen": "nohost",
            "max_request_body": "4TiB",
            "trusted_proxies": ["10.0.0.0/8", "10.0.0.0/33"],
            "allowed_origins": ["null"],
        },
        "log": {"level": "verbose"},
        "limits": {"unauthenticated": {"burts": 3, "period": "-5s", "average": 0}},
        "sessions": {"max_ttl": "12 hours"},
        "upstream": {"idle_timeout": 0},
        "identity": {"ttl": "11m"},
        "jwks": {"max_size": -1, "min_ttl": "2h", "max_ttl": "1h"},
        "apps": [
            {"name": "a", "servers": ["http://127.0.0.1:1/mcp"]},
            {
                "name": "a",
                "label": {"env": "x"},
                "servers": ["ftp://x/mcp", "https://user:hunter2@h.example/mcp"],
            },
            {"servers": []},
        ],
        "app_auth_configs": [
            {
                "name": "both",
                "app_labels": {"*": "prod"},
                "jwt": {
                    "issuer": "https://i",
                    "audience": "a",
                    "jwks_url": "https://i/jwks",
                    "static_jwks": static_jwks(),
                    "isuer": "typo",
                },
            },
            {
                "name": "neither",
                "app_labels": {"env": "^prod($"},
                "jwt": {"issuer": "https://i", "audience": "a", "algorithms": ["HS256", "none"]},
            },
            {
                "name": "bad-static",
                "app_labels": {"env": "x"},
                "jwt": {"issuer": "https://i", "audience": "a", "static_jwks": "not json"},
            },
            {
                "name": "creds",
                "app_labels": {"env": "x"},
                "jwt": {"audience": "a", "jwks_url": "https://u:hunter2@i/jwks"},
            },
            {"name": "no-jwt", "app_labels": {"env": "x"}},
            {"name": "creds", "app_labels": {}, "jwt": {"audience": "a", "jwks_url": "https://i"}},
        ],
    }


EXPECTED = [
    ("sever", "unknown key"),
    ("server.listn", "unknown key"),
    ("server.listen", "not host:port"),
    ("server.max_request_body", "not a size"),
    ("server.trusted_proxies[1]", "not a CIDR"),
    ("server.allowed_origins[0]", 'the "null" origin cannot be allowed'),
    ("log.level", "one of debug, info, warning, error"),
    ("limits.unauthenticated.burts", "unknown key"),
    ("limits.unauthenticated.period", "not a duration"),
    ("limits.unauthenticated.average", "expected a positive integer"),
    ("sessions.max_ttl", "not a duration"),
    ("upstream.idle_timeout", "must be greater than zero"),
    ("identity.ttl", "at most 10m"),
    ("jwks.max_size", "must not be negative"),
    ("jwks.min_ttl", "must not exceed max_ttl"),
    ("apps[1].label", "unknown key"),
    ("apps[1].servers[0]", "not an http(s) URL"),
    ("apps[1].servers[1]", "credentials in URLs are not allowed"),
    ("apps[1].name", "duplicate app name 'a'"),
    ("apps[2].name", "required"),
    ("apps[2].servers", "at least one server is required"),
    ("app_auth_configs[0].app_labels", 'label key "*" may only be used with value "*"'),
    ("app_auth_configs[0].jwt.isuer", "unknown key"),
    ("app_auth_configs[0].jwt", "exactly one of jwks_url or static_jwks is required"),
    ("app_auth_configs[1].app_labels", "bad regular expression '^prod($'"),
    ("app_auth_configs[1].jwt.algorithms", "not allowed: HS256, none"),
    ("app_auth_configs[1].jwt", "exactly one of jwks_url or static_jwks is required"),
    ("app_auth_configs[2].jwt.static_jwks", "not valid JSON"),
    ("app_auth_configs[3].jwt.issuer", "required"),
    ("app_auth_configs[3].jwt.jwks_url", "credentials in URLs are not allowed"),
    ("app_auth_configs[4].jwt", "required"),
    ("app_auth_configs[5].app_labels", "must select at least one label"),
    ("app_auth_configs[5].jwt.issuer", "required"),
    ("app_auth_configs[5].name", "duplicate app auth config name 'creds'"),
]


def test_every_problem_reported_at_once_with_its_key_path() -> None:
    problems = problems_of(bad_doc())
    for path, message in EXPECTED:
        matching = [p for p in problems if p.startswith(f"{path}: ") and message in p]
        assert matching, f"missing problem {path}: {message}\n" + "\n".join(problems)
    assert len(problems) == len(EXPECTED), "\n".join(problems)  # and nothing spurious


def test_problems_never_echo_credentials() -> None:
    assert "hunter2" not in "\n".join(problems_of(bad_doc()))


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("server", "public_url", "mcp.example.com", "not an http(s) URL"),
        ("server", "public_url", "https://mcp.example.com/#frag", "must not have a fragment"),
        ("server", "listen", "127.0.0.1:70000", "port out of range"),
        ("server", "listen", ":8443", "missing host"),
        ("server", "max_header_size", "512", "must be at least 1KiB"),
        ("server", "allowed_origins", ["https://a.example/path"], "not an origin"),
        ("server", "state_dir", " ", "must not be empty"),
        ("admin", "enabled", "yes", "expected true or false"),
        ("log", "format", "xml", "one of json, console, auto"),
        ("identity", "header", "Authorization", "reserved"),
        ("identity", "header", "bad header", "not a valid HTTP header name"),
        ("sessions", "max_ttl", "0s", "must be greater than zero"),
        ("server", "shutdown_grace", float("nan"), "finite"),
        ("sessions", "max_ttl", float("inf"), "finite"),
    ],
)
def test_single_value_problems(section: str, key: str, value: object, message: str) -> None:
    doc = good_doc()
    doc.setdefault(section, {})[key] = value
    [problem] = problems_of(doc)
    path = f"{section}.{key}"
    assert problem.startswith(f"{path}: ") or problem.startswith(f"{path}["), problem
    assert message in problem


@pytest.mark.parametrize(
    ("jwt", "path", "message"),
    [
        ({"leeway": "10m"}, "jwt.leeway", "at most 5m"),
        ({"username_claim": ""}, "jwt.username_claim", "must not be empty"),
        ({"max_token_age": "0s"}, "jwt.max_token_age", "must be greater than zero"),
        ({"algorithms": ["RS256", 5]}, "jwt.algorithms[1]", "expected a string"),
        ({"algorithms": ["HS512"]}, "jwt.algorithms", "not allowed: HS512"),
        ({"jwks_url": "file:///etc/jwks.json"}, "jwt.jwks_url", "not an http(s) URL"),
        ({"audience": []}, "jwt.audience", "a string or a non-empty list"),
        ({"audience": ["a", ""]}, "jwt.audience[1]", "must not be empty"),
        ({"audience": 5}, "jwt.audience", "a string or a non-empty list"),
        ({"resource_audience": "yes"}, "jwt.resource_audience", "expected true or false"),
        ({"username_claim": ["email", 5]}, "jwt.username_claim[1]", "expected a string"),
        ({"username_claim": []}, "jwt.username_claim", "a string or a non-empty list"),
        ({"required_scopes": "mcp"}, "jwt.required_scopes", "expected a list"),
        ({"required_scopes": ["mcp", "a b"]}, "jwt.required_scopes[1]", "not an OAuth scope"),
        ({"required_scopes": ['x"y']}, "jwt.required_scopes[0]", "not an OAuth scope"),
    ],
)
def test_jwt_problems(jwt: dict[str, Any], path: str, message: str) -> None:
    doc = good_doc()
    doc["app_auth_configs"] = [auth_config(**jwt)]
    [problem] = problems_of(doc)
    assert problem.startswith(f"app_auth_configs[0].{path}: "), problem
    assert message in problem


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        ({"server": "x"}, "server: expected a table"),
        ({"apps": {"name": "a"}}, "apps: expected an array of tables ([[...]])"),
        ({"apps": ["a"]}, "apps[0]: expected a table"),
        ({"apps": [{"name": "a", "servers": "http://h/mcp"}]}, "apps[0].servers: expected a list"),
        ({"apps": [{"name": "a b", "servers": ["http://h"]}]}, "apps[0].name: names are"),
        (
            {"apps": [{"name": "a", "labels": {"x": 1}, "servers": ["http://h"]}]},
            "apps[0].labels: label 'x': value must be a string",
        ),
    ],
)
def test_structural_problems(doc: dict[str, Any], problem: str) -> None:
    [found] = problems_of(doc)
    assert found.startswith(problem), found


# --- durations and sizes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("250ms", 0.25),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("1.5s", 1.5),
        ("1m30s500ms", 90.5),
        (" 5m ", 300.0),
        ("0s", 0.0),
        (45, 45.0),
        (1.5, 1.5),
        (0, 0.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["", "5", "5x", "m5", "-5s", "5m 30s", "5 m", "1h30", "ms", True, None, [5], -1, float("nan")],
)
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("4MiB", 4 * 1024 * 1024),
        ("512KiB", 512 * 1024),
        ("1KB", 1000),
        ("2MB", 2_000_000),
        ("1GiB", 1024**3),
        ("100B", 100),
        ("1000", 1000),
        (" 4 MiB ", 4 * 1024 * 1024),
        (1000, 1000),
        (0, 0),
    ],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["4TiB", "1.5MiB", "-1", "MiB", "4mib", "", -1, 1.5, True, None])
def test_bad_sizes(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


# --- the example file --------------------------------------------------------------------------


def test_example_file_parses() -> None:
    settings = load_settings(str(EXAMPLE))
    assert settings.apps
    assert settings.app_auth_configs
    assert settings.path == str(EXAMPLE)


# --- config_dir: one app auth config per *.toml file -------------------------------------------


CORP = """\
name = "{name}"
app_labels = {{ env = "prod" }}
[jwt]
issuer = "https://idp.example.com"
audience = "proxyd"
jwks_url = "https://idp.example.com/jwks.json"
"""


def with_dir(directory: Path, **changes: Any) -> dict[str, Any]:
    doc = good_doc()
    doc["app_auth"] = {"config_dir": str(directory)}
    doc.update(changes)
    return doc


def test_config_dir_loads_one_config_per_file(tmp_path: Path) -> None:
    (tmp_path / "b.toml").write_text(CORP.format(name="zeta"))
    (tmp_path / "a.toml").write_text(CORP.format(name="alpha"))
    (tmp_path / "README.md").write_text("not a config")
    (tmp_path / "old.toml.bak").write_text("garbage = [")
    settings = parse_settings(with_dir(tmp_path))
    assert [c.name for c in settings.app_auth_configs] == ["alpha", "corp", "zeta"]  # name order
    sources = {c.name: c.source for c in settings.app_auth_configs}
    assert sources == {
        "alpha": str(tmp_path / "a.toml"),
        "corp": "main",
        "zeta": str(tmp_path / "b.toml"),
    }
    assert settings.app_auth_config_dir == str(tmp_path)


@pytest.mark.parametrize(
    ("jwt", "audience", "resource_audience"),
    [
        ({"audience": ["a", "b", "a"]}, ("a", "b"), True),
        ({"audience": "a", "resource_audience": False}, ("a",), False),
        ({"audience": None}, (), True),  # only the resource URL is accepted
    ],
)
def test_jwt_audiences(
    jwt: dict[str, Any], audience: tuple[str, ...], resource_audience: bool
) -> None:
    doc = good_doc()
    config = auth_config(**jwt)
    if jwt.get("audience", "") is None:
        del config["jwt"]["audience"]
    doc["app_auth_configs"] = [config]
    settings = parse_settings(doc)
    assert settings.app_auth_configs[0].jwt.audience == audience
    assert settings.app_auth_configs[0].jwt.resource_audience is resource_audience


def test_a_config_accepting_no_audience_is_refused() -> None:
    doc = good_doc()
    config = auth_config(resource_audience=False)
    del config["jwt"]["audience"]
    doc["app_auth_configs"] = [config]
    assert problems_of(doc) == [
        "app_auth_configs[0].jwt: accepts no audience: set audience, or leave "
        "resource_audience = true"
    ]


def test_username_claims_and_required_scopes_read() -> None:
    doc = good_doc()
    doc["app_auth_configs"] = [
        auth_config(
            username_claim=["email", "preferred_username", "sub"],
            required_scopes=["mcp", "tools.read", "mcp"],
        )
    ]
    jwt = parse_settings(doc).app_auth_configs[0].jwt
    assert jwt.username_claim == ("email", "preferred_username", "sub")
    assert jwt.required_scopes == ("mcp", "tools.read")


def test_config_dir_file_problems_name_the_file_and_key(tmp_path: Path) -> None:
    (tmp_path / "good.toml").write_text(CORP.format(name="good"))
    (tmp_path / "bad.toml").write_text(
        'name = "bad"\napp_labels = { env = "prod" }\ntypo = 1\n'
        '[jwt]\nissuer = "https://i"\njwks_url = "ftp://i/jwks"\nresource_audience = false\n'
    )
    (tmp_path / "syntax.toml").write_text("name = [")
    configs, problems = load_app_auth_dir(str(tmp_path))
    assert [c.name for c in configs] == ["good"]
    bad, syntax = tmp_path / "bad.toml", tmp_path / "syntax.toml"
    assert f"{bad}: typo: unknown key" in problems
    assert (
        f"{bad}: jwt: accepts no audience: set audience, or leave resource_audience = true"
        in problems
    )
    assert f"{bad}: jwt.jwks_url: not an http(s) URL" in problems
    assert any(p.startswith(f"{syntax}: ") for p in problems)
    assert len(problems) == 4, problems
    # Through parse_settings they fail the whole configuration.
    assert sorted(problems_of(with_dir(tmp_path))) == sorted(problems)


def test_duplicate_name_across_files_is_an_error_for_the_later_file(tmp_path: Path) -> None:
    (tmp_path / "a.toml").write_text(CORP.format(name="shared"))
    (tmp_path / "b.toml").write_text(CORP.format(name="shared"))
    [problem] = problems_of(with_dir(tmp_path))
    assert problem.startswith(f"{tmp_path / 'b.toml'}: ")
    assert "'shared'" in problem
    assert problem.endswith(f"already defined in {tmp_path / 'a.toml'}")


def test_duplicate_of_main_file_config_is_an_error_for_the_file(tmp_path: Path) -> None:
    (tmp_path / "corp.toml").write_text(CORP.format(name="corp"))
    [problem] = problems_of(with_dir(tmp_path))
    assert problem.startswith(f"{tmp_path / 'corp.toml'}: app auth config 'corp'")
    assert problem.endswith("already defined in main")


def test_config_dir_must_be_a_directory(tmp_path: Path) -> None:
    [problem] = problems_of(with_dir(tmp_path / "missing"))
    assert problem == f"app_auth.config_dir: not a directory: {tmp_path / 'missing'}"


def test_config_dir_problems_come_with_main_file_problems(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('name = "x"\n')
    problems = problems_of(with_dir(tmp_path, log={"level": "loud"}))
    assert any(p.startswith("log.level: ") for p in problems)
    assert any(p.startswith(f"{tmp_path / 'bad.toml'}: jwt: required") for p in problems)


# --- load_settings and the CLI -----------------------------------------------------------------


def write_toml(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


GOOD_TOML = """\
[server]
listen = "127.0.0.1:{port}"
state_dir = "{state}"

[admin]
enabled = false

[[apps]]
name = "billing"
labels = {{ env = "prod" }}
servers = ["http://127.0.0.1:9/mcp"]

[[app_auth_configs]]
name = "corp"
app_labels = {{ env = "prod" }}
[app_auth_configs.jwt]
issuer = "https://idp.example.com"
audience = "proxyd"
jwks_url = "https://idp.example.com/jwks.json"
"""

BAD_TOML = (
    GOOD_TOML
    + """
[sessions]
max_ttl = "forever"
tpyo = 1

[[apps]]
name = "second"
servers = ["ftp://example.com/mcp"]
"""
)
BAD_PROBLEMS = (
    "sessions.max_ttl: not a duration",
    "sessions.tpyo: unknown key",
    "apps[1].servers[0]: not an http(s) URL",
)


def test_load_settings_reports_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings(str(tmp_path / "absent.toml"))
    assert "cannot read" in exc.value.problems[0]
    broken = write_toml(tmp_path / "broken.toml", "[server\n")
    with pytest.raises(ConfigError) as exc:
        load_settings(broken)
    assert exc.value.problems[0].startswith(f"{broken}: ")
    (tmp_path / "latin1.toml").write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(ConfigError) as exc:
        load_settings(str(tmp_path / "latin1.toml"))
    assert "not UTF-8" in exc.value.problems[0]


def test_bad_toml_fixture_is_what_the_cli_tests_think_it_is(tmp_path: Path) -> None:
    doc = tomllib.loads(BAD_TOML.format(port=1, state=tmp_path))
    problems = problems_of(doc)
    assert len(problems) == len(BAD_PROBLEMS)
    for expected in BAD_PROBLEMS:
        assert any(p.startswith(expected) for p in problems)


async def proxyd_cli(*args: str) -> tuple[int, str, str]:
    """Run ``python -m proxyd ARGS`` as a real process; its exit code, stdout and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxyd",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        # A failure guard only: these commands must exit on their own at once.
        out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "good.toml", GOOD_TOML.format(port=8443, state=tmp_path))
    code, out, err = await proxyd_cli("check-config", "-c", path)
    assert code == 0, err
    assert "ok (1 apps, 1 app auth configs)" in out


async def test_check_config_lists_every_problem(tmp_path: Path) -> None:
    path = write_toml(tmp_path / "bad.toml", BAD_TOML.format(port=8443, state=tmp_path))
    code, out, err = await proxyd_cli("check-config", "-c", path)
    assert code != 0
    assert f"{len(BAD_PROBLEMS)} problem(s)" in err
    for problem in BAD_PROBLEMS:
        assert problem in err, err
    assert "ok" not in out


async def test_check_config_names_a_weak_static_key(tmp_path: Path) -> None:
    jwks = json.dumps({"keys": [weak_entry()]})
    text = GOOD_TOML.format(port=8443, state=tmp_path).replace(
        'jwks_url = "https://idp.example.com/jwks.json"', f"static_jwks = '{jwks}'"
    )
    path = write_toml(tmp_path / "weak.toml", text)
    code, out, err = await proxyd_cli("check-config", "-c", path)
    assert code == 2, err
    assert "1 problem(s)" in err
    expected = f"app_auth_configs[0].jwt.static_jwks.keys[0]: {TOO_SMALL.format(bits=512)}"
    assert expected in err, err
    assert "ok" not in out


async def test_check_config_of_a_missing_file_fails(tmp_path: Path) -> None:
    code, _, err = await proxyd_cli("check-config", "-c", str(tmp_path / "nope.toml"))
    assert code != 0
    assert "cannot read" in err


async def test_run_refuses_a_bad_file_without_listening(tmp_path: Path) -> None:
    state = tmp_path / "state"
    port = free_port()
    path = write_toml(tmp_path / "bad.toml", BAD_TOML.format(port=port, state=state))
    code, out, err = await proxyd_cli("run", "-c", path)
    assert code != 0
    for problem in BAD_PROBLEMS:
        assert problem in err, err
    events = [json.loads(line)["event"] for line in out.splitlines() if line.startswith("{")]
    assert "config_invalid" in events
    assert "proxyd_started" not in events
    assert not state.exists()  # never got as far as creating its identity key


# --- connection hygiene of the listener (issue 10): server.header_timeout & co -----------------


def test_connection_hygiene_defaults() -> None:
    server = parse_settings(good_doc()).server
    assert server.header_timeout == 10.0
    assert server.body_timeout == 60.0
    assert server.keepalive_timeout == 75.0
    assert server.max_connections == 20_000


def test_connection_hygiene_values_parse() -> None:
    doc = good_doc()
    doc["server"].update(
        header_timeout="2s", body_timeout="1m30s", keepalive_timeout="250ms", max_connections=5
    )
    server = parse_settings(doc).server
    assert (server.header_timeout, server.body_timeout) == (2.0, 90.0)
    assert (server.keepalive_timeout, server.max_connections) == (0.25, 5)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("header_timeout", "0s", "must be greater than zero"),
        ("header_timeout", "soon", "not a duration: 'soon'"),
        ("header_timeout", -1, "must not be negative"),
        ("body_timeout", "0ms", "must be greater than zero"),
        ("body_timeout", True, "expected a duration"),
        ("keepalive_timeout", "0s", "must be greater than zero"),
        ("keepalive_timeout", float("inf"), "must be a finite number of seconds"),
        ("max_connections", 0, "expected a positive integer"),
        ("max_connections", "20000", "expected a positive integer"),
        ("max_connections", True, "expected a positive integer"),
    ],
)
def test_connection_hygiene_bad_values_name_their_key(key: str, value: Any, message: str) -> None:
    doc = good_doc()
    doc["server"][key] = value
    [problem] = problems_of(doc)
    assert problem.startswith(f"server.{key}: {message}"), problem


def test_example_file_shows_the_connection_hygiene_keys() -> None:
    server = tomllib.loads(EXAMPLE.read_text())["server"]
    assert server["header_timeout"] == "10s"
    assert server["body_timeout"] == "60s"
    assert server["keepalive_timeout"] == "75s"
    assert server["max_connections"] == 20000
