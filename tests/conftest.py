"""Shared fixtures: a real upstream on 127.0.0.1, event files, and the real Lambda handler."""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import boto3
import pytest
import uvloop
from aws_lambda_powertools import Logger

from fanout.observability import DEFAULT_SERVICE
from fanout_local.upstream import LocalUpstream, running_in_thread
from fanout_local.worker import LocalContext

ROOT = Path(__file__).resolve().parents[1]
EVENTS = ROOT / "events"
HANDLER_FILE = ROOT / "functions" / "api" / "app.py"

T = TypeVar("T")

# Every loop the tests make is the kind the functions run on (fanout.lambda_loop: uvloop), so the egress
# guard, the timeouts and the engine are tested on the loop that carries them in Lambda.
asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def load_event(name: str) -> dict[str, Any]:
    """An event file from events/, as `sam local invoke -e` would read it."""
    return json.loads((EVENTS / name).read_text())


def event_files() -> list[str]:
    return sorted(path.name for path in EVENTS.glob("*.json"))


def lambda_context() -> LocalContext:
    return LocalContext(function_name="test", timeout_s=30)


def post_batch(
    handler: Any, body: dict[str, Any], *, context: LocalContext | None = None
) -> tuple[int, dict[str, Any]]:
    """The batch event file with another body, through the handler (Mangum and the app)."""
    event = copy.deepcopy(load_event("batch-http-api-v2.json"))
    event["body"] = json.dumps(body)
    event["headers"]["content-length"] = str(len(event["body"]))
    response = handler(event, context or lambda_context())
    return response["statusCode"], json.loads(response["body"])


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run on a private loop, leaving the thread's current loop (the handler's) alone."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


class _CurrentStdout:
    """Writes to whatever sys.stdout is now, so capsys sees the logs of the test it runs in."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()


# The first Powertools Logger of a service sets its handler for the whole process (later ones
# reuse it), and test modules build apps while they are collected: so create it here, first.
Logger(service=DEFAULT_SERVICE, stream=_CurrentStdout())  # type: ignore[arg-type]


@pytest.fixture
def upstream() -> Iterator[LocalUpstream]:
    with running_in_thread(delay_ms=10) as server:
        yield server


@pytest.fixture
def import_handler(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Import functions/api/app.py afresh (a cold start) with the given environment."""
    loaded: list[tuple[ModuleType, asyncio.AbstractEventLoop]] = []

    def cold_start(**env: str) -> ModuleType:
        env = {"FANOUT_ALLOW_PRIVATE_NETWORKS": "true", **env}  # the test upstream is on loopback
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        spec = importlib.util.spec_from_file_location(f"lambda_entry_{len(loaded)}", HANDLER_FILE)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        loaded.append((module, asyncio.get_event_loop()))  # the loop its entry point installed
        return module

    yield cold_start
    for module, loop in loaded:  # each container ends: close its client, then its loop
        loop.run_until_complete(module.app.state.transport.aclose())
        loop.close()
    if loaded:
        asyncio.set_event_loop(None)


# --- the SAM CLI and its build (offline: validate --lint and build need no AWS account) ------------

TEMPLATE = ROOT / "template.yaml"


@pytest.fixture(scope="session")
def sam(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    cli = os.environ.get("FANOUT_SAM_CLI") or shutil.which("sam")
    if not cli:
        pytest.skip("SAM CLI not found: run the tests with `make test`, which installs it")
    home = tmp_path_factory.mktemp("sam-home")
    env = {
        **os.environ,
        "HOME": str(home),  # SAM writes its config under ~/.aws-sam
        "SAM_CLI_TELEMETRY": "0",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return cli, env


def runtime_python() -> str | None:
    """A python3.13 that runs (pyenv's shim may exist without the version selected)."""
    found = shutil.which("python3.13")
    if found and subprocess.run([found, "-c", "pass"], capture_output=True).returncode == 0:
        return found
    return None


@pytest.fixture(scope="session")
def built(sam: tuple[str, dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `sam build` per test session, into a scratch directory."""
    if runtime_python() is None:
        pytest.skip("sam build needs python3.13 on PATH (with pyenv: PYENV_VERSION=3.13.0)")
    cli, env = sam
    scratch = tmp_path_factory.mktemp("sam-build")
    done = subprocess.run(
        [
            cli,
            "build",
            "--template",
            str(TEMPLATE),
            "--build-dir",
            str(scratch / "build"),
            "--cache-dir",
            str(scratch / "cache"),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return scratch / "build"


# --- the jobs' AWS resources (moto in-process, or its server for the local stack) -----------------

REGION = "us-east-1"
TABLE, INPUT, RESULTS = "jobs", "fanout-input", "fanout-results"


def create_resources() -> dict[str, str]:
    """What template.yaml declares, as boto3 creates it (fanout_local.stack does the same for make run)."""
    dynamodb = boto3.client("dynamodb", region_name=REGION)
    dynamodb.create_table(
        TableName=TABLE,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        BillingMode="PAY_PER_REQUEST",
    )
    s3 = boto3.client("s3", region_name=REGION)
    for bucket in (INPUT, RESULTS):
        s3.create_bucket(Bucket=bucket)
    sqs = boto3.client("sqs", region_name=REGION)
    dead = sqs.create_queue(QueueName="chunks-dead")["QueueUrl"]
    dead_arn = sqs.get_queue_attributes(QueueUrl=dead, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    redrive = json.dumps({"deadLetterTargetArn": dead_arn, "maxReceiveCount": "2"})
    chunks = sqs.create_queue(QueueName="chunks", Attributes={"RedrivePolicy": redrive, "VisibilityTimeout": "1"})[
        "QueueUrl"
    ]
    return {"chunks": chunks, "dead": dead, "dead_arn": dead_arn}
