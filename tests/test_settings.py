"""Configuration: defaults, and bad values failing the cold start with the variable's name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from conftest import HANDLER_FILE
from fanout.settings import LOCAL_UPSTREAM_URL, ConfigError, load_settings


def test_defaults_match_the_documented_table(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("FANOUT_"):
            monkeypatch.delenv(name)
    settings = load_settings()
    assert str(settings.target_url) == LOCAL_UPSTREAM_URL
    assert (settings.max_concurrency, settings.max_requests) == (10, 1000)
    assert (settings.request_timeout_s, settings.deadline_s) == (5.0, 25.0)
    assert settings.transport == "pyreqwest"


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"FANOUT_MAX_CONCURRENCY": "abc"}, "FANOUT_MAX_CONCURRENCY (got 'abc')"),
        (
            {"FANOUT_MAX_CONCURRENCY": "0"},
            "FANOUT_MAX_CONCURRENCY (got '0'): Input should be greater than or equal to 1",
        ),
        ({"FANOUT_MAX_REQUESTS": "-1"}, "FANOUT_MAX_REQUESTS"),
        ({"FANOUT_DEADLINE_S": "30"}, "FANOUT_DEADLINE_S (got '30'): Input should be less than 29"),
        ({"FANOUT_TARGET_URL": "not a url"}, "FANOUT_TARGET_URL"),
        ({"FANOUT_TRANSPORT": "httpx"}, "FANOUT_TRANSPORT (got 'httpx'): Input should be 'pyreqwest' or 'aiohttp'"),
        (
            {"FANOUT_REQUEST_TIMEOUT_S": "20", "FANOUT_DEADLINE_S": "10"},
            "FANOUT_REQUEST_TIMEOUT_S (20.0) must not exceed FANOUT_DEADLINE_S (10.0)",
        ),
    ],
)
def test_bad_value_names_the_variable(env: dict[str, str], named: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert named in str(error.value)


def test_bad_config_fails_the_cold_start() -> None:
    env = {**os.environ, "FANOUT_MAX_CONCURRENCY": "lots"}
    code = f"import runpy; runpy.run_path({str(HANDLER_FILE)!r})"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 1
    assert "ConfigError: Invalid configuration: FANOUT_MAX_CONCURRENCY (got 'lots')" in done.stderr


@pytest.mark.parametrize(
    ("upstreams", "named"),
    [
        ({"a": {"url": "https://a.example", "allow_cidrs": ["10.0.0.0/8"]}}, "allow_cidrs narrows a private target"),
        ({"a": {"url": "https://a.example", "private": True, "allow_cidrs": ["10.0.0.1/8"]}}, "[a.allow_cidrs.0]"),
        ({"a": {"url": "https://a.example", "redirect_hosts": ["https://b.example"]}}, "is not a lower-case host name"),
        ({"a": {"url": "https://a.example", "redirect_hosts": ["B.example"]}}, "is not a lower-case host name"),
        ({"a": {"url": "https://a.example", "redirect_hosts": ["b.example:8443"]}}, "is not a lower-case host name"),
        ({"a": {"url": "http://a.example"}}, "is plain http: set allow_http to true"),
        ({"a": {"url": "https://a.example", "max_redirects": 11}}, "[a.max_redirects]"),
    ],
)
def test_bad_target_names_the_target_and_field(
    upstreams: dict[str, Any], named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FANOUT_UPSTREAMS", json.dumps(upstreams))
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert str(error.value).startswith("Invalid configuration: FANOUT_UPSTREAMS")
    assert named in str(error.value)


def test_a_private_target_with_its_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    target = {"url": "https://db.internal", "private": True, "allow_cidrs": ["10.1.0.0/16", "fd00:1::/64"]}
    monkeypatch.setenv("FANOUT_UPSTREAMS", json.dumps({"db": target, "b": "https://b.example"}))
    settings = load_settings()
    assert [str(net) for net in settings.upstreams["db"].allow_cidrs] == ["10.1.0.0/16", "fd00:1::/64"]
    assert (settings.upstreams["b"].private, settings.upstreams["b"].redirect_hosts) == (False, ())


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"FANOUT_REQUEST_TIMEOUT_S": "26", "FANOUT_DEADLINE_S": "25"},
            "Invalid configuration: FANOUT_REQUEST_TIMEOUT_S (26.0) must not exceed FANOUT_DEADLINE_S (25.0)",
        ),
        (
            {"FANOUT_MAX_REQUESTS": "60000"},
            "Invalid configuration: FANOUT_MAX_REQUESTS (60000) allows answers of up to 4800000 bytes, "
            "over FANOUT_MAX_RESPONSE_BYTES (4000000): lower one or raise the other",
        ),
        (
            {"FANOUT_UPSTREAMS": '{"a": "http://a.example"}'},
            "Invalid configuration: FANOUT_UPSTREAMS [a]: http://a.example/ is plain http: "
            "set allow_http to true for this target, or use https",
        ),
    ],
)
def test_configuration_errors_read_as_sentences(
    env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert str(error.value) == message
