"""Configuration: defaults, and bad values failing the cold start with the variable's name."""

from __future__ import annotations

import os
import subprocess
import sys

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
    assert settings.transport == "aiohttp"


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
        ({"FANOUT_TRANSPORT": "httpx"}, "FANOUT_TRANSPORT (got 'httpx'): Input should be 'aiohttp'"),
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
