"""``[tracing]`` (issue 14 §1): defaults, every invalid form named by its key, the collector's
headers kept secret (never in a problem, a settings repr, check-config's output or a log line),
and which keys a reload cannot change."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from proxyd.config import RESTART_ONLY, ConfigError, in_force, parse_settings

SECRET = "s3cr3t-collector-key"


def problems_of(tracing: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_settings({"tracing": tracing})
    return exc.value.problems


def test_tracing_is_off_by_default() -> None:
    tracing = parse_settings({}).tracing
    assert not tracing.enabled and tracing.otlp_endpoint == ""
    assert tracing.sample_ratio == 1.0 and tracing.service_name == "proxyd"
    assert not tracing.headers and not tracing.include_user and not tracing.trust_client_context
    assert not parse_settings({"tracing": {"otlp_endpoint": ""}}).tracing.enabled


def test_a_full_tracing_section() -> None:
    tracing = parse_settings(
        {
            "tracing": {
                "otlp_endpoint": "https://otlp.example.com:4318/",
                "sample_ratio": 0,
                "service_name": "edge-proxyd",
                "headers": {"X-Api-Key": SECRET, "X-Tenant": "a b"},
                "include_user": True,
                "trust_client_context": True,
            }
        }
    ).tracing
    assert tracing.enabled and tracing.otlp_endpoint == "https://otlp.example.com:4318"
    assert tracing.sample_ratio == 0.0 and tracing.service_name == "edge-proxyd"
    assert tracing.headers.reveal() == {"X-Api-Key": SECRET, "X-Tenant": "a b"}
    assert tracing.headers.names == ("X-Api-Key", "X-Tenant")
    assert tracing.include_user and tracing.trust_client_context


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("otlp_endpoint", "ftp://collector:4318", "expected an http:// or https:// URL"),
        ("otlp_endpoint", "collector:4318", "expected an http:// or https:// URL"),
        ("otlp_endpoint", 4318, "expected an http(s) URL"),
        ("otlp_endpoint", "http://collector:99999", "not a valid port"),
        ("otlp_endpoint", "http://u:p@collector:4318", "credentials in URLs are not allowed"),
        ("otlp_endpoint", "http://collector:4318/?a=1", "no query or fragment"),
        ("otlp_endpoint", "http://collector:4318/v1/traces", "proxyd appends /v1/traces"),
        ("sample_ratio", 1.5, "expected a number from 0 to 1"),
        ("sample_ratio", -0.1, "expected a number from 0 to 1"),
        ("sample_ratio", "1", "expected a number from 0 to 1"),
        ("sample_ratio", True, "expected a number from 0 to 1"),
        ("sample_ratio", float("nan"), "expected a number from 0 to 1"),
        ("service_name", "", "must not be empty"),
        ("headers", "X-Api-Key: x", "expected a table of header"),
        ("include_user", "yes", "expected true or false"),
        ("trust_client_context", 1, "expected true or false"),
        ("colour", "blue", "unknown key"),
    ],
)
def test_each_invalid_value_is_named_by_its_key(key: str, value: object, message: str) -> None:
    [problem] = problems_of({key: value})
    assert problem.startswith(f"tracing.{key}: "), problem
    assert message in problem, problem


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"X-Api-Key": f"{SECRET}\r\nX-Evil: 1"}, "X-Api-Key: the value must be"),
        ({"X-Api-Key": f" {SECRET}"}, "X-Api-Key: the value must be"),
        ({"X-Api-Key": f"{SECRET}\n"}, "X-Api-Key: the value must be"),
        ({"X-Api-Key\n": SECRET}, "is not a valid HTTP header name"),
        ({"X-Api-Key": ""}, "X-Api-Key: the value must be"),
        ({"X-Api-Key": SECRET + "é"}, "X-Api-Key: the value must be"),
        ({"X-Api-Key": SECRET * 1000}, "X-Api-Key: the value must be"),
        ({"X-Api-Key": 7}, "X-Api-Key: the value must be a string"),
        ({"bad name": SECRET}, "'bad name' is not a valid HTTP header name"),
        ({"Content-Type": SECRET}, "Content-Type is set by the exporter itself"),
    ],
)
def test_each_invalid_header_is_named_and_its_value_never_shown(
    headers: dict[str, object], message: str
) -> None:
    [problem] = problems_of({"headers": headers})
    assert problem.startswith("tracing.headers: ") and message in problem, problem
    assert SECRET not in problem


def test_every_bad_header_is_reported_at_once() -> None:
    problems = problems_of({"headers": {"A": "", "B": "ok", "C": 1}, "sample_ratio": 2})
    assert len(problems) == 3, problems


def test_the_secret_stays_out_of_the_settings_repr() -> None:
    settings = parse_settings(
        {"tracing": {"otlp_endpoint": "http://c:4318", "headers": {"K": SECRET}}}
    )
    assert SECRET not in repr(settings) and "K" in repr(settings.tracing.headers)
    assert SECRET not in str(settings.tracing)


def test_exporter_keys_are_restart_only_the_others_reload() -> None:
    restart = {key for key in RESTART_ONLY if key.startswith("tracing.")}
    assert restart == {
        "tracing.otlp_endpoint",
        "tracing.sample_ratio",
        "tracing.service_name",
        "tracing.headers",
    }
    boot = parse_settings({"tracing": {"otlp_endpoint": "http://a:4318", "headers": {"K": "1"}}})
    new = parse_settings(
        {
            "tracing": {
                "otlp_endpoint": "http://b:4318",
                "headers": {"K": "2"},
                "include_user": True,
                "trust_client_context": True,
            }
        }
    )
    changed = [key for key, value in RESTART_ONLY.items() if value(boot) != value(new)]
    assert sorted(changed) == ["tracing.headers", "tracing.otlp_endpoint"]
    kept = in_force(new, boot).tracing
    assert kept.otlp_endpoint == "http://a:4318" and kept.headers.reveal() == {"K": "1"}
    assert kept.include_user and kept.trust_client_context


async def test_check_config_never_prints_a_header_value(tmp_path: Path) -> None:
    path = tmp_path / "proxyd.toml"
    path.write_text(
        "[tracing]\n"
        'otlp_endpoint = "http://127.0.0.1:4318"\n'
        f'headers = {{ "X-Api-Key" = "{SECRET}", "X-Bad" = "{SECRET}\\n" }}\n'
        "sample_ratio = 3\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxyd",
        "check-config",
        "-c",
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 2
    text = (out + err).decode()
    assert "tracing.headers: X-Bad: the value must be" in text
    assert "tracing.sample_ratio: expected a number from 0 to 1" in text
    assert SECRET not in text


@pytest.mark.parametrize(
    "doc",
    [
        {"identity": {"header": "X-Id\n"}},
        {"apps": [{"name": "a\n", "servers": ["http://127.0.0.1:1/mcp"]}]},
    ],
)
def test_a_trailing_newline_is_not_a_valid_name(doc: dict[str, Any]) -> None:
    # re's "$" also matches before a final newline: names are checked whole (fullmatch).
    with pytest.raises(ConfigError):
        parse_settings(doc)
