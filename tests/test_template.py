"""template.yaml: what it declares matches the app, SAM accepts it, and the built artifacts run alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import APIRoute

from conftest import EVENTS, ROOT, runtime_python
from fanout.app import create_app
from fanout.settings import Settings
from fanout_local.template import load_template, local_functions, placeholders
from fanout_local.upstream import LocalUpstream

TEMPLATE = ROOT / "template.yaml"


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template(TEMPLATE)


JOB_ROUTES = {
    ("POST", "/jobs"),
    ("POST", "/jobs/uploads"),
    ("GET", "/jobs/{job_id}"),
    ("GET", "/jobs/{job_id}/results"),
    ("DELETE", "/jobs/{job_id}"),
}


SEED_ROUTES = {("GET", "/sync/{n}"), ("GET", "/async/{n}"), ("GET", "/async_sem/{n}/{k}")}


def _served(app: Any) -> set[tuple[str, str]]:
    return {(method, route.path) for route in app.routes if isinstance(route, APIRoute) for method in route.methods}


def test_each_function_serves_exactly_its_routes_in_the_template(
    template: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each function's app, built from the environment the template gives it, has the routes API Gateway
    sends it and no other (a seed function carries neither /batch's nor the jobs' code); the function of
    the $default route also knows the seed routes' paths, so a wrong method on one is a 405 there."""
    functions = local_functions(template, ROOT, {"TargetUrl": "https://example.com"}, placeholders(template))
    (default,) = [function.name for function in functions for route in function.routes if route.is_default]
    assert default == "BatchFunction"  # its app answers 404 and 405 for the rest
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")  # the jobs routes' clients (no call is made)
    jobs = {"jobs_table": "t", "input_bucket": "i", "results_bucket": "r", "chunk_queue_url": "q"}
    served = {}
    for function in functions:
        if function.routes:
            given = jobs if "FANOUT_JOBS_TABLE" in function.environment else {}
            served[function.name] = _served(create_app(Settings(routes=function.environment["FANOUT_ROUTES"], **given)))
            declared = {(route.method, route.path) for route in function.routes if not route.is_default}
            assert served[function.name] >= declared, function.name
    assert served == {
        "SyncFunction": {("GET", "/sync/{n}")},
        "GatherFunction": {("GET", "/async/{n}")},
        "SemaphoreFunction": {("GET", "/async_sem/{n}/{k}")},
        "BatchFunction": {*SEED_ROUTES, ("POST", "/batch")},
        "JobsFunction": JOB_ROUTES,
    }


def test_an_app_with_all_routes_serves_the_jobs_only_with_their_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """What `create_app()` builds by default (FANOUT_ROUTES=all): what tests and a single local app serve."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    jobs = {"jobs_table": "t", "input_bucket": "i", "results_bucket": "r", "chunk_queue_url": "q"}
    assert _served(create_app(Settings())) == {*SEED_ROUTES, ("POST", "/batch")}
    assert _served(create_app(Settings(**jobs))) == {*SEED_ROUTES, ("POST", "/batch"), *JOB_ROUTES}


def test_a_seed_functions_cold_start_loads_none_of_what_it_does_not_serve() -> None:
    """No /batch machinery (tenacity, aiolimiter), no aiohttp, no boto3, and no pydantic.v1 (FastAPI would
    import it to learn that a route parameter is no v1 model): each some milliseconds of a cold start.
    Nor yarl, even for /batch: its URLs are read by the client's own parser (some 9 ms of yarl, multidict,
    idna and propcache at a cold start); nor tenacity, which a container loads at its first retry."""
    code = (
        "import sys, fanout.app; fanout.app.create_app();"
        "loaded = {'fanout.batch', 'fanout.batch_api', 'tenacity', 'aiolimiter', 'yarl', 'aiohttp', 'boto3',"
        " 'pydantic.v1'};"
        "print(sorted(loaded & set(sys.modules)))"
    )

    def loaded(**variables: str) -> str:
        env = {**os.environ, **variables}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        return out.stdout.strip()

    assert loaded(FANOUT_ROUTES="async_sem") == "[]"
    assert loaded(FANOUT_ROUTES="batch") == "['fanout.batch', 'fanout.batch_api']"  # no rate cap, no retry yet
    with_cap = loaded(FANOUT_ROUTES="batch", FANOUT_RATE_PER_S="50")
    assert with_cap == "['aiolimiter', 'fanout.batch', 'fanout.batch_api']"


def test_fastapi_still_refuses_a_pydantic_v1_model_once_v1_is_imported() -> None:
    """fanout.app skips FastAPI's import of pydantic.v1, not its check."""
    import warnings

    from fastapi import FastAPI
    from fastapi.exceptions import PydanticV1NotSupportedError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pydantic import v1

    class Old(v1.BaseModel):
        size: int

    def old(body: Any) -> None: ...

    old.__annotations__["body"] = Old  # this module's annotations are strings FastAPI could not resolve here
    with pytest.raises(PydanticV1NotSupportedError, match=r"pydantic\.v1 models are no longer supported"):
        FastAPI().post("/old")(old)


def test_each_function_that_sends_requests_has_its_own_concurrency_parameter(template: dict[str, Any]) -> None:
    refs = {
        name: resource["Properties"]["Environment"]["Variables"].get("FANOUT_MAX_CONCURRENCY", {}).get("Ref")
        for name, resource in template["Resources"].items()
        if resource["Type"] == "AWS::Serverless::Function"
    }
    assert refs == {
        "BatchFunction": "BatchMaxConcurrency",
        "SyncFunction": "SyncMaxConcurrency",
        "GatherFunction": "GatherMaxConcurrency",
        "SemaphoreFunction": "SemaphoreMaxConcurrency",
        "WorkerFunction": "WorkerMaxConcurrency",
        "JobsFunction": None,  # it records jobs and queues them: no upstream request
    }
    assert all(ref in template["Parameters"] for ref in refs.values() if ref)


def test_the_chunk_queue_outlasts_the_worker_and_feeds_it_partial_failures(template: dict[str, Any]) -> None:
    """AWS's advice (visibility at least 6 times the function's timeout) holds for the defaults and for
    every samconfig environment, and the worker also refuses to start when it does not."""
    import tomllib

    params = template["Parameters"]
    assert int(params["ChunkVisibilityTimeoutSeconds"]["Default"]) >= 6 * int(params["WorkerTimeoutSeconds"]["Default"])
    config = tomllib.loads((ROOT / "samconfig.toml").read_text())
    for env in ("dev", "prod"):
        overrides = config[env]["deploy"]["parameters"]["parameter_overrides"]
        visibility = int(
            overrides.get("ChunkVisibilityTimeoutSeconds", params["ChunkVisibilityTimeoutSeconds"]["Default"])
        )
        timeout = int(overrides.get("WorkerTimeoutSeconds", params["WorkerTimeoutSeconds"]["Default"]))
        assert visibility >= 6 * timeout, env
    with pytest.raises(ValueError, match="CHUNK_VISIBILITY_TIMEOUT_S \\(100\\) must be at least 6 times"):
        Settings(worker_timeout_s=30, chunk_visibility_timeout_s=100)
    worker = template["Resources"]["WorkerFunction"]["Properties"]
    chunks = worker["Events"]["Chunks"]["Properties"]
    assert chunks["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert chunks["ScalingConfig"]["MaximumConcurrency"] == {"Ref": "WorkerMaximumConcurrency"}
    assert worker["Environment"]["Variables"]["FANOUT_WORKERS"] == {"Ref": "WorkerMaximumConcurrency"}
    assert worker["Timeout"] == {"Ref": "WorkerTimeoutSeconds"}
    queue = template["Resources"]["ChunkQueue"]["Properties"]
    assert queue["RedrivePolicy"]["deadLetterTargetArn"] == {"Fn::GetAtt": "ChunkDeadLetterQueue.Arn"}


def test_every_environments_worker_has_room_for_the_answers_of_its_chunks(template: dict[str, Any]) -> None:
    """The worker refuses to start when WorkerBatchSize x ChunkItems answers could fill half its memory, or
    their results files its /tmp: the defaults and every samconfig environment must start, and the template
    tells the worker all four."""
    import tomllib

    from fanout.jobs.worker import check_answers_fit, check_results_fit

    params = template["Parameters"]
    config = tomllib.loads((ROOT / "samconfig.toml").read_text())
    for env in ("defaults", "dev", "prod"):
        overrides = {} if env == "defaults" else config[env]["deploy"]["parameters"]["parameter_overrides"]
        chosen = {name: int(overrides.get(name, params[name]["Default"])) for name in ("WorkerBatchSize", "ChunkItems")}
        settings = Settings(worker_batch_size=chosen["WorkerBatchSize"], chunk_items=chosen["ChunkItems"])
        check_answers_fit(settings, int(overrides.get("WorkerMemorySize", params["WorkerMemorySize"]["Default"])))
        tmp_mb = int(overrides.get("WorkerTmpSize", params["WorkerTmpSize"]["Default"]))
        check_results_fit(settings, tmp_mb * 2**20)  # /tmp empty at cold start (MB are MiB to Lambda)
    worker = template["Resources"]["WorkerFunction"]["Properties"]
    assert worker["MemorySize"] == {"Ref": "WorkerMemorySize"}
    assert worker["EphemeralStorage"] == {"Size": {"Ref": "WorkerTmpSize"}}
    assert worker["Environment"]["Variables"]["FANOUT_WORKER_BATCH_SIZE"] == {"Ref": "WorkerBatchSize"}
    assert worker["Environment"]["Variables"]["FANOUT_CHUNK_ITEMS"] == {"Ref": "ChunkItems"}
    assert "FANOUT_MAX_ITEM_BYTES" not in worker["Environment"]["Variables"]  # the 256 KiB the parameters name


def test_private_networks_are_declared_and_never_allowed_in_the_template(template: dict[str, Any]) -> None:
    """Declared, so that `sam local --env-vars` may set it for a local upstream; false wherever it is written."""
    assert template["Globals"]["Function"]["Environment"]["Variables"]["FANOUT_ALLOW_PRIVATE_NETWORKS"] == "false"
    assert TEMPLATE.read_text().count("FANOUT_ALLOW_PRIVATE_NETWORKS") == 1


def test_each_route_is_written_once_per_auth_mode_without_novalue(template: dict[str, Any]) -> None:
    """The SAM CLI's resolver cannot take Fn::If with AWS::NoValue in a route's AuthorizerId (start-api fails)."""
    routes = {name: r for name, r in template["Resources"].items() if r["Type"] == "AWS::ApiGatewayV2::Route"}
    by_condition: dict[str, set[str]] = {}
    for resource in routes.values():
        by_condition.setdefault(resource["Condition"], set()).add(resource["Properties"]["RouteKey"])
        assert "Fn::If" not in json.dumps(resource["Properties"])
    assert (
        by_condition["UseIam"]
        == by_condition["UseJwt"]
        == {
            "GET /sync/{n}",
            "GET /async/{n}",
            "GET /async_sem/{n}/{k}",
            "POST /batch",
            "$default",
            *(f"{method} {path}" for method, path in JOB_ROUTES),
        }
    )


def test_target_url_is_required_and_deadline_fits_api_gateway(template: dict[str, Any]) -> None:
    params = template["Parameters"]
    assert "Default" not in params["TargetUrl"]
    assert params["DeadlineSeconds"]["MaxValue"] < 29
    assert template["Globals"]["Function"]["Timeout"] > params["DeadlineSeconds"]["MaxValue"]


# --- the SAM CLI (offline: validate --lint and build need no AWS account) ---------------------


@pytest.mark.sam
def test_sam_validate_lint_is_clean(sam: tuple[str, dict[str, str]]) -> None:
    cli, env = sam
    done = subprocess.run(
        [cli, "validate", "--lint", "--template", str(TEMPLATE)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "is a valid SAM Template" in done.stdout
    assert "[W" not in done.stdout + done.stderr


@pytest.mark.sam
def test_built_layer_ships_bytecode_lambda_will_use(built: Path) -> None:
    """/opt is read-only: without .pyc every cold start recompiles (see layers/fanout/Makefile)."""
    layer = built / "FanoutLayer" / "python"
    for module in ("app", "engine", "settings", "transports"):
        pyc = layer / "fanout" / "__pycache__" / f"{module}.cpython-313.pyc"
        flags = int.from_bytes(pyc.read_bytes()[4:8], "little")
        assert flags == 0b01, f"{pyc.name}: want an unchecked hash-based pyc (PEP 552), flags={flags:#b}"
    assert not (layer / "fanout_local").exists()  # development tools stay out of the layer
    assert (layer / "aiohttp" / "__pycache__").is_dir()


BUILT_INVOKE = textwrap.dedent(
    """
    import json, sys, types
    import app  # functions/api as Lambda's /var/task
    event = json.load(open(sys.argv[1]))
    context = types.SimpleNamespace(
        function_name="fn", memory_limit_in_mb=512, aws_request_id="req-1",
        invoked_function_arn="arn:aws:lambda:us-east-1:123456789012:function:fn",
        get_remaining_time_in_millis=lambda: 30000,
    )
    response = app.handler(event, context)
    import fanout
    print(json.dumps({"response": response, "fanout": fanout.__file__, "path": sys.path}))
    """
)


@pytest.mark.sam
@pytest.mark.parametrize("function", ["SyncFunction", "GatherFunction", "SemaphoreFunction"])
def test_built_artifacts_alone_answer_an_event(built: Path, function: str, upstream: LocalUpstream) -> None:
    runtime = runtime_python()
    assert runtime is not None
    code_dir, layer_dir = built / function, built / "FanoutLayer" / "python"
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": f"{code_dir}{os.pathsep}{layer_dir}",  # /var/task and /opt/python on Lambda
        "FANOUT_TARGET_URL": f"{upstream.url}/delay?ms=1",
        "FANOUT_ALLOW_PRIVATE_NETWORKS": "true",  # the test upstream is on loopback
    }
    event = {"SyncFunction": "sync", "GatherFunction": "async", "SemaphoreFunction": "async_sem"}[function]
    # -S: no site-packages at all, so only the built function and layer can satisfy the imports
    done = subprocess.run(
        [runtime, "-S", "-c", BUILT_INVOKE, str(EVENTS / f"{event}-http-api-v2.json")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    *logs, last = done.stdout.splitlines()  # the function's JSON logs and EMF lines, then ours
    out = json.loads(last)
    assert any(json.loads(line).get("message") == "fanout call" for line in logs)
    assert out["fanout"].startswith(str(layer_dir))
    assert not any(".venv" in entry for entry in out["path"])
    assert out["response"]["statusCode"] == 200
    body = json.loads(out["response"]["body"])
    assert body["succeeded"] == body["requests"] > 0
