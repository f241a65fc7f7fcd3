"""What `sam deploy --config-env dev|prod` would create, offline.

template.yaml goes through the SAM translator (the library `sam deploy` hands it
to, run in the SAM CLI's venv) with each samconfig.toml environment's parameters,
and a few variants; the resulting CloudFormation is then read twice:
- by `deployed()`, which decides conditions and parameter references the way
  CloudFormation does, for assertions on every resource;
- by moto's CloudFormation and AWS APIs (`stack_in_moto`), for the resources moto
  models: Lambda functions and layer, IAM roles, log groups, SNS. moto's
  CloudFormation has no `AWS::CloudWatch::Alarm` and no `AWS::ApiGatewayV2::*`:
  alarms are created through moto's CloudWatch API from the translated properties
  (so an AWS API model still checks them), and the API, stage, routes and
  authorizer are covered by the assertions on the translated template only.
"""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import textwrap
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from conftest import ROOT
from fanout.observability import DEFAULT_SERVICE
from fanout_local.template import load_template

TEMPLATE = ROOT / "template.yaml"
SAMCONFIG = ROOT / "samconfig.toml"
ENVIRONMENTS = ("dev", "prod")
REGION = "us-east-1"
FUNCTIONS = ("Sync", "Gather", "Semaphore", "Batch")  # the API functions with their own limits
ALL_FUNCTIONS = (*FUNCTIONS, "Jobs", "Worker")
ROLES = {"Sync": "Api", "Gather": "Api", "Semaphore": "Api", "Batch": "Api", "Jobs": "Jobs", "Worker": "Worker"}
ROUTES = {
    "GET /sync/{n}": "Sync",
    "GET /async/{n}": "Gather",
    "GET /async_sem/{n}/{k}": "Semaphore",
    "POST /batch": "Batch",
    "$default": "Batch",  # the rest: the app's JSON 404 and 405
    "POST /jobs": "Jobs",
    "POST /jobs/uploads": "Jobs",
    "GET /jobs/{job_id}": "Jobs",
    "GET /jobs/{job_id}/results": "Jobs",
    "DELETE /jobs/{job_id}": "Jobs",
}
BASIC_EXECUTION = "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole"  # its own log streams
XRAY_WRITE = "arn:aws:iam::aws:policy/AWSXrayWriteOnlyAccess"  # only with tracing on
VPC_ACCESS = "arn:aws:iam::aws:policy/service-role/AWSLambdaVPCAccessExecutionRole"  # only in a VPC
#: The only managed policies a function role may carry (no `*` action in any).
ALLOWED_MANAGED_POLICIES = {BASIC_EXECUTION, XRAY_WRITE, VPC_ACCESS}
_NO_VALUE = object()


def samconfig_parameters(env: str) -> dict[str, str]:
    overrides = tomllib.loads(SAMCONFIG.read_text())[env]["deploy"]["parameters"]["parameter_overrides"]
    return {name: str(value) for name, value in overrides.items()}


TRANSLATE = textwrap.dedent(
    """
    import json, sys
    import boto3
    from samtranslator.parser.parser import Parser
    from samtranslator.translator.translator import Translator
    from samtranslator.yaml_helper import yaml_parse

    region, source = sys.argv[1], open(sys.argv[2]).read()
    translated = {}
    for name, params in json.load(sys.stdin).items():
        template = yaml_parse(source)
        template["Globals"]["Function"]["CodeUri"] = "s3://artifacts/function.zip"  # uploaded by sam deploy
        template["Resources"]["FanoutLayer"]["Properties"]["ContentUri"] = "s3://artifacts/layer.zip"
        template["Resources"]["WorkerFunction"]["Properties"]["CodeUri"] = "s3://artifacts/worker.zip"
        translator = Translator(None, Parser(), boto_session=boto3.Session(region_name=region))
        # The managed policies are given as full ARNs: there is no name to look up (and no AWS to ask).
        translated[name] = translator.translate(template, params, get_managed_policy_map=lambda: {})
    print(json.dumps(translated))
    """
)
OTEL_LAYER = "arn:aws:lambda:us-east-1:123456789012:layer:AWSOpenTelemetryDistroPython:9"
TOPIC = "arn:aws:sns:us-east-1:123456789012:ops"


def variants() -> dict[str, dict[str, str]]:
    """Each samconfig environment, and the switches samconfig leaves off, on top of one of them."""
    dev, prod = samconfig_parameters("dev"), samconfig_parameters("prod")
    return {
        "dev": dev,
        "prod": prod,
        "dev, otel layer": {**dev, "OtelLayerArn": OTEL_LAYER},
        "dev, otel layer, tracing off": {**dev, "OtelLayerArn": OTEL_LAYER, "TracingEnabled": "false"},
        "prod, jwt": {**prod, "AuthMode": "JWT", "JwtIssuer": "https://issuer.example.com", "JwtAudience": "client-1"},
        "prod, own topic": {**prod, "AlarmTopicArn": TOPIC},
        "prod, in a vpc": {**prod, "VpcSubnetIds": "subnet-1,subnet-2", "VpcSecurityGroupIds": "sg-1"},
        "prod, tracing off": {**prod, "TracingEnabled": "false"},
    }


@pytest.fixture(scope="module")
def translations() -> dict[str, dict[str, Any]]:
    cli = os.environ.get("FANOUT_SAM_CLI")
    if not cli:
        pytest.skip("SAM CLI not found: run the tests with `make test`, which installs it")
    done = subprocess.run(
        [str(Path(cli).with_name("python")), "-c", TRANSLATE, REGION, str(TEMPLATE)],
        input=json.dumps(variants()),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def shape(translations: dict[str, dict[str, Any]], variant: str) -> dict[str, Any]:
    return deployed(translations[variant], variants()[variant])


def deployed(template: dict[str, Any], params: dict[str, str]) -> dict[str, Any]:
    """The resources CloudFormation would create: conditions decided, Fn::If taken, parameter
    Refs replaced by their values, AWS::NoValue removed. Other intrinsics are left as they are."""
    values: dict[str, Any] = {
        name: params.get(name, str(spec.get("Default", ""))) for name, spec in template["Parameters"].items()
    }
    for name, spec in template["Parameters"].items():
        if spec["Type"] == "CommaDelimitedList":
            values[name] = values[name].split(",")
    decided: dict[str, bool] = {}

    def condition(name: str) -> bool:
        if name not in decided:
            decided[name] = truth(template["Conditions"][name])
        return decided[name]

    def truth(node: dict[str, Any]) -> bool:
        ((function, args),) = node.items()
        if function == "Fn::Equals":
            return str(resolve(args[0])) == str(resolve(args[1]))
        if function == "Fn::Not":
            return not truth(args[0])
        if function == "Fn::And":
            return all(truth(arg) for arg in args)
        if function == "Fn::Or":
            return any(truth(arg) for arg in args)
        assert function == "Condition", node
        return condition(args)

    def resolve(node: Any) -> Any:
        if isinstance(node, list):
            return [item for item in map(resolve, node) if item is not _NO_VALUE]
        if not isinstance(node, dict):
            return node
        if node.keys() == {"Ref"} and node["Ref"] == "AWS::NoValue":
            return _NO_VALUE
        if node.keys() == {"Ref"} and node["Ref"] in values:
            return values[node["Ref"]]
        if node.keys() == {"Fn::If"}:
            name, when_true, when_false = node["Fn::If"]
            return resolve(when_true if condition(name) else when_false)
        if node.keys() == {"Fn::Join"}:
            separator, items = node["Fn::Join"]
            return separator.join(resolve(items))
        resolved = {key: resolve(value) for key, value in node.items()}
        return {key: value for key, value in resolved.items() if value is not _NO_VALUE}

    return {
        name: resolve(resource)
        for name, resource in template["Resources"].items()
        if "Condition" not in resource or condition(resource["Condition"])
    }


@pytest.fixture(scope="module", params=ENVIRONMENTS)
def env(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def translated(translations: dict[str, dict[str, Any]], env: str) -> dict[str, Any]:
    return translations[env]


@pytest.fixture(scope="module")
def resources(translated: dict[str, Any], env: str) -> dict[str, Any]:
    return deployed(translated, samconfig_parameters(env))


def of_type(resources: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: resource["Properties"] for name, resource in resources.items() if resource["Type"] == kind}


# --- the translated template, with each environment's parameters ------------------------------


def test_each_function_gets_its_environments_limits_layer_and_observability(
    resources: dict[str, Any], env: str
) -> None:
    params = samconfig_parameters(env)
    functions = of_type(resources, "AWS::Lambda::Function")
    assert set(functions) == {f"{name}Function" for name in ALL_FUNCTIONS}
    (layer,) = of_type(resources, "AWS::Lambda::LayerVersion")
    for name in FUNCTIONS:
        function = functions[f"{name}Function"]
        assert function["Environment"]["Variables"]["FANOUT_MAX_CONCURRENCY"] == params[f"{name}MaxConcurrency"]
        reserved = int(params[f"{name}ReservedConcurrency"])
        assert function.get("ReservedConcurrentExecutions") == (str(reserved) if reserved else None)
    for name in ALL_FUNCTIONS:
        function = functions[f"{name}Function"]
        variables = function["Environment"]["Variables"]
        assert function["Role"] == {"Fn::GetAtt": [f"{ROLES[name]}FunctionRole", "Arn"]}
        assert function["Layers"] == [{"Ref": layer}]  # no OtelLayerArn in samconfig: only ours
        assert "AWS_LAMBDA_EXEC_WRAPPER" not in variables
        assert variables["FANOUT_ALLOW_PRIVATE_NETWORKS"] == "false"  # declared for sam local --env-vars only
        assert variables["LOG_LEVEL"] == params["LogLevel"]
        assert variables["POWERTOOLS_METRICS_NAMESPACE"] == params["MetricsNamespace"]
        assert function["TracingConfig"] == {"Mode": "Active" if params["TracingEnabled"] == "true" else "PassThrough"}
        timeout = params["WorkerTimeoutSeconds"] if name == "Worker" else 30
        assert function["Runtime"] == "python3.13" and str(function["Timeout"]) == str(timeout)
    for name in ("Batch", "Jobs", "Worker"):
        assert functions[f"{name}Function"]["Environment"]["Variables"]["FANOUT_UPSTREAMS"] == params["Upstreams"]
    where = {
        "FANOUT_JOBS_TABLE": {"Ref": "JobsTable"},
        "FANOUT_INPUT_BUCKET": {"Ref": "InputBucket"},
        "FANOUT_RESULTS_BUCKET": {"Ref": "ResultsBucket"},
        "FANOUT_CHUNK_QUEUE_URL": {"Ref": "ChunkQueue"},
    }
    jobs, worker = (functions[f"{name}Function"]["Environment"]["Variables"] for name in ("Jobs", "Worker"))
    assert jobs.items() >= where.items() and worker.items() >= where.items()
    assert worker["FANOUT_MAX_CONCURRENCY"] == params["WorkerMaxConcurrency"]
    assert worker["FANOUT_WORKERS"] == params["WorkerMaximumConcurrency"]
    assert worker["FANOUT_DEAD_LETTER_QUEUE_ARN"] == {"Fn::GetAtt": ["ChunkDeadLetterQueue", "Arn"]}
    assert worker["FANOUT_CHUNK_VISIBILITY_TIMEOUT_S"] == params["ChunkVisibilityTimeoutSeconds"]


def test_the_worker_reads_the_chunk_queue_with_partial_failures_and_its_dead_letters(
    resources: dict[str, Any], env: str
) -> None:
    params = samconfig_parameters(env)
    mappings = {
        props["EventSourceArn"]["Fn::GetAtt"][0]: props
        for props in of_type(resources, "AWS::Lambda::EventSourceMapping").values()
    }
    assert set(mappings) == {"ChunkQueue", "ChunkDeadLetterQueue"}
    chunks = mappings["ChunkQueue"]
    assert chunks["FunctionName"] == {"Ref": "WorkerFunction"}
    assert chunks["ScalingConfig"] == {"MaximumConcurrency": params["WorkerMaximumConcurrency"]}
    assert str(chunks["BatchSize"]) == params["WorkerBatchSize"]
    assert chunks["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    queue = of_type(resources, "AWS::SQS::Queue")["ChunkQueue"]
    assert queue["VisibilityTimeout"] == params["ChunkVisibilityTimeoutSeconds"]
    assert queue["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": ["ChunkDeadLetterQueue", "Arn"]},
        "maxReceiveCount": params["ChunkMaxReceives"],
    }


def test_the_job_stores_are_private_encrypted_and_expire(resources: dict[str, Any], env: str) -> None:
    params = samconfig_parameters(env)
    buckets = of_type(resources, "AWS::S3::Bucket")
    assert set(buckets) == {"InputBucket", "ResultsBucket"}
    for bucket in buckets.values():
        assert set(bucket["PublicAccessBlockConfiguration"].values()) == {True}
        (rule,) = bucket["BucketEncryption"]["ServerSideEncryptionConfiguration"]
        assert rule["ServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
        (expiry, *_) = bucket["LifecycleConfiguration"]["Rules"]
        assert expiry["ExpirationInDays"] == params["JobRetentionDays"]
    policies = of_type(resources, "AWS::S3::BucketPolicy")
    assert {policy["Bucket"]["Ref"] for policy in policies.values()} == set(buckets)
    for policy in policies.values():
        (statement,) = policy["PolicyDocument"]["Statement"]
        assert statement["Effect"] == "Deny" and statement["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    (table,) = of_type(resources, "AWS::DynamoDB::Table").values()
    assert table["BillingMode"] == "PAY_PER_REQUEST"
    assert table["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}
    assert table["SSESpecification"] == {"SSEEnabled": True}


def test_reserved_concurrency_is_set_in_prod_and_left_to_the_account_in_dev(
    resources: dict[str, Any], env: str
) -> None:
    reserved = {
        name: props.get("ReservedConcurrentExecutions")
        for name, props in of_type(resources, "AWS::Lambda::Function").items()
        if name.removesuffix("Function") in FUNCTIONS  # the worker's bound is its mapping's MaximumConcurrency
    }
    if env == "prod":
        assert all(value is not None and int(value) > 0 for value in reserved.values()), reserved
    else:
        assert set(reserved.values()) == {None}


def test_the_otel_layer_and_its_wrapper_come_together(translations: dict[str, dict[str, Any]]) -> None:
    for function in of_type(shape(translations, "dev, otel layer"), "AWS::Lambda::Function").values():
        assert function["Layers"][1] == OTEL_LAYER
        assert function["Environment"]["Variables"]["AWS_LAMBDA_EXEC_WRAPPER"] == "/opt/otel-instrument"
    off = shape(translations, "dev, otel layer, tracing off")
    for function in of_type(off, "AWS::Lambda::Function").values():
        assert len(function["Layers"]) == 1 and "AWS_LAMBDA_EXEC_WRAPPER" not in function["Environment"]["Variables"]
        assert function["TracingConfig"] == {"Mode": "PassThrough"}


@pytest.mark.parametrize(("variant", "auth_mode"), [("prod", "AWS_IAM"), ("prod, jwt", "JWT")])
def test_routes_reach_their_function_with_the_chosen_authorizer_and_throttles(
    translations: dict[str, dict[str, Any]], variant: str, auth_mode: str
) -> None:
    params, resources = variants()[variant], shape(translations, variant)
    integrations = of_type(resources, "AWS::ApiGatewayV2::Integration")
    routes = {props["RouteKey"]: props for props in of_type(resources, "AWS::ApiGatewayV2::Route").values()}
    assert set(routes) == set(ROUTES)
    authorizers = of_type(resources, "AWS::ApiGatewayV2::Authorizer")
    for key, function in ROUTES.items():
        integration = integrations[routes[key]["Target"]["Fn::Sub"].removeprefix("integrations/${").rstrip("}")]
        assert integration["IntegrationUri"] == {"Fn::GetAtt": [f"{function}Function", "Arn"]}
        assert routes[key]["AuthorizationType"] == auth_mode
        if auth_mode == "JWT":
            assert routes[key]["AuthorizerId"] == {"Ref": "JwtAuthorizer"}
        else:
            assert "AuthorizerId" not in routes[key]
    assert set(authorizers) == ({"JwtAuthorizer"} if auth_mode == "JWT" else set())
    (stage,) = of_type(resources, "AWS::ApiGatewayV2::Stage").values()
    assert stage["DefaultRouteSettings"] == {
        "ThrottlingBurstLimit": params["ThrottlingBurstLimit"],
        "ThrottlingRateLimit": params["ThrottlingRateLimit"],
    }
    assert stage["AccessLogSettings"]["DestinationArn"] == {"Fn::GetAtt": ["ApiAccessLogGroup", "Arn"]}
    access_format = stage["AccessLogSettings"]["Format"]
    assert json.loads(access_format.replace("\n", ""))["requestId"] == "$context.requestId"


def test_every_log_group_expires(resources: dict[str, Any], env: str) -> None:
    params = samconfig_parameters(env)
    groups = of_type(resources, "AWS::Logs::LogGroup")
    assert {name: props["RetentionInDays"] for name, props in groups.items()} == {
        **{f"{name}FunctionLogGroup": params["LogRetentionDays"] for name in ALL_FUNCTIONS},
        "ApiAccessLogGroup": params["AccessLogRetentionDays"],
    }
    for name in ALL_FUNCTIONS:  # the group the function writes to, not a look-alike
        assert groups[f"{name}FunctionLogGroup"]["LogGroupName"] == {"Fn::Sub": f"/aws/lambda/${{{name}Function}}"}


def test_alarms_cover_every_function_and_the_api(resources: dict[str, Any]) -> None:
    alarms = of_type(resources, "AWS::CloudWatch::Alarm")
    timeout_ms = 30 * 1000
    for name in ALL_FUNCTIONS:
        by_metric = {
            props["MetricName"]: props
            for props in alarms.values()
            if props.get("Dimensions") == [{"Name": "FunctionName", "Value": {"Ref": f"{name}Function"}}]
        }
        if name == "Worker":  # its throttles are its mapping's ceiling at work, its duration up to its timeout
            assert set(by_metric) == {"Errors"}
            continue
        assert set(by_metric) == {"Errors", "Throttles", "Duration"}
        assert by_metric["Duration"]["Threshold"] == 0.9 * timeout_ms
        assert by_metric["Duration"]["Statistic"] == "Maximum"
    (api,) = [props for props in alarms.values() if props.get("Namespace") == "AWS/ApiGateway"]
    assert (api["MetricName"], api["Dimensions"]) == ("5xx", [{"Name": "ApiId", "Value": {"Ref": "FanoutApi"}}])
    (dead,) = [props for props in alarms.values() if props.get("Namespace") == "AWS/SQS"]
    assert dead["Dimensions"] == [{"Name": "QueueName", "Value": {"Fn::GetAtt": ["ChunkDeadLetterQueue", "QueueName"]}}]
    assert (dead["MetricName"], dead["Threshold"]) == ("ApproximateNumberOfMessagesVisible", 1)
    assert len(alarms) == 5 * 3 + 1 + 1 + 1 + 1  # and TargetThrottledAlarm, below
    assert all(props["AlarmActions"] == [{"Ref": "AlarmTopic"}] for props in alarms.values())
    assert "AlarmTopic" in of_type(resources, "AWS::SNS::Topic")


def test_the_throttled_target_alarm_reads_what_the_functions_emit(resources: dict[str, Any], env: str) -> None:
    """MaxTargetThrottledShare, as observability emits it (dimensions function and service), for
    every function; the worst of them over 50 % for three 5-minute periods."""
    throttled = of_type(resources, "AWS::CloudWatch::Alarm")["TargetThrottledAlarm"]
    queries = {query["Id"]: query for query in throttled["Metrics"]}
    functions = {"sync", "gather", "semaphore", "batch"}
    assert set(queries) == functions | {"worst"}
    for function in functions:
        metric = queries[function]["MetricStat"]["Metric"]
        assert metric["MetricName"] == "MaxTargetThrottledShare"
        assert metric["Namespace"] == samconfig_parameters(env)["MetricsNamespace"]
        dimensions = {d["Name"]: d["Value"] for d in metric["Dimensions"]}
        assert dimensions == {"function": function, "service": DEFAULT_SERVICE}
        assert queries[function]["ReturnData"] is False
    assert queries["worst"]["Expression"] == "MAX([sync, gather, semaphore, batch])"
    assert (throttled["Threshold"], throttled["EvaluationPeriods"], throttled["DatapointsToAlarm"]) == (50, 3, 3)


def test_alarms_notify_a_given_topic_instead_of_creating_one(translations: dict[str, dict[str, Any]]) -> None:
    resources = shape(translations, "prod, own topic")
    assert of_type(resources, "AWS::SNS::Topic") == {}
    alarms = of_type(resources, "AWS::CloudWatch::Alarm").values()
    assert {tuple(props["AlarmActions"]) for props in alarms} == {(TOPIC,)}


def managed_policies(resources: dict[str, Any], role: str = "ApiFunctionRole") -> set[str]:
    """The managed policies of a function role, ${AWS::Partition} filled in."""
    props = of_type(resources, "AWS::IAM::Role")[role]
    return {arn["Fn::Sub"].replace("${AWS::Partition}", "aws") for arn in props["ManagedPolicyArns"]}


@pytest.mark.parametrize(
    ("variant", "policies"),
    [
        ("dev", {BASIC_EXECUTION, XRAY_WRITE}),
        ("prod", {BASIC_EXECUTION, XRAY_WRITE}),
        ("prod, tracing off", {BASIC_EXECUTION}),
        ("prod, in a vpc", {BASIC_EXECUTION, XRAY_WRITE, VPC_ACCESS}),
    ],
)
def test_each_policy_comes_only_with_what_needs_it(
    translations: dict[str, dict[str, Any]], variant: str, policies: set[str]
) -> None:
    resources = shape(translations, variant)
    for role in ("ApiFunctionRole", "JobsFunctionRole", "WorkerFunctionRole"):
        assert managed_policies(resources, role) == policies, role
    for function in of_type(resources, "AWS::Lambda::Function").values():
        if VPC_ACCESS in policies:
            assert function["VpcConfig"] == {"SubnetIds": ["subnet-1", "subnet-2"], "SecurityGroupIds": ["sg-1"]}
        else:
            assert "VpcConfig" not in function
        assert function["TracingConfig"] == {"Mode": "Active" if XRAY_WRITE in policies else "PassThrough"}


def test_roles_are_least_privilege(resources: dict[str, Any]) -> None:
    roles = of_type(resources, "AWS::IAM::Role")
    assert set(roles) == {"ApiFunctionRole", "JobsFunctionRole", "WorkerFunctionRole"}
    for name, role in roles.items():
        assert managed_policies(resources, name) <= ALLOWED_MANAGED_POLICIES
        statements = [s for policy in role.get("Policies", []) for s in policy["PolicyDocument"]["Statement"]]
        actions = [a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])]
        assert not [a for a in actions if a == "*" or a.endswith(":*")]
        assert all(statement["Resource"] != "*" for statement in statements)  # each names what it reaches
        (trust,) = role["AssumeRolePolicyDocument"]["Statement"]
        assert trust["Principal"] == {"Service": ["lambda.amazonaws.com"]}
    assert "Policies" not in roles["ApiFunctionRole"]  # the API functions call nothing of AWS


def granted(resources: dict[str, Any], role: str) -> dict[str, set[str]]:
    """Action -> the resources (as JSON) a role's inline policies grant it on."""
    found: dict[str, set[str]] = {}
    for policy in of_type(resources, "AWS::IAM::Role")[role]["Policies"]:
        for statement in policy["PolicyDocument"]["Statement"]:
            assert statement["Effect"] == "Allow"
            targets = statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
            for action in statement["Action"]:
                found.setdefault(action, set()).update(json.dumps(target, sort_keys=True) for target in targets)
    return found


def test_the_jobs_roles_reach_only_their_own_table_buckets_and_queues(resources: dict[str, Any]) -> None:
    """Least privilege; the jobs function lists only the uploads prefix and the worker the results prefix
    (a HEAD of a missing object is a 404 with s3:ListBucket, a 403 without it)."""
    table = json.dumps({"Fn::GetAtt": ["JobsTable", "Arn"]})
    queue = json.dumps({"Fn::GetAtt": ["ChunkQueue", "Arn"]})
    dead = json.dumps({"Fn::GetAtt": ["ChunkDeadLetterQueue", "Arn"]})
    inputs = {json.dumps({"Fn::Sub": f"${{InputBucket.Arn}}/{prefix}/*"}) for prefix in ("uploads", "jobs")}
    results = {json.dumps({"Fn::Sub": "${ResultsBucket.Arn}/results/*"})}
    jobs, worker = granted(resources, "JobsFunctionRole"), granted(resources, "WorkerFunctionRole")
    assert jobs == {
        "dynamodb:GetItem": {table},
        "dynamodb:PutItem": {table},
        "dynamodb:UpdateItem": {table},
        "dynamodb:Query": {table},
        "s3:GetObject": inputs | results,
        "s3:PutObject": inputs,
        "s3:ListBucket": {json.dumps({"Fn::GetAtt": ["InputBucket", "Arn"]})},
        "sqs:SendMessage": {queue},
    }
    assert worker == {
        "dynamodb:GetItem": {table},
        "dynamodb:UpdateItem": {table},
        "dynamodb:Query": {table},
        "dynamodb:BatchGetItem": {table},
        "dynamodb:ConditionCheckItem": {table},
        "s3:GetObject": inputs | results,
        "s3:PutObject": results,
        "s3:ListBucket": {json.dumps({"Fn::GetAtt": ["ResultsBucket", "Arn"]})},
        "sqs:SendMessage": {queue},
        "sqs:ReceiveMessage": {queue, dead},
        "sqs:DeleteMessage": {queue, dead},
        "sqs:GetQueueAttributes": {queue, dead},
        "sqs:ChangeMessageVisibility": {queue, dead},
    }
    for role, prefix in [("JobsFunctionRole", "uploads/*"), ("WorkerFunctionRole", "results/*")]:
        (listing,) = [
            statement
            for policy in of_type(resources, "AWS::IAM::Role")[role]["Policies"]
            for statement in policy["PolicyDocument"]["Statement"]
            if statement["Action"] == ["s3:ListBucket"]
        ]
        assert listing["Condition"] == {"StringLike": {"s3:prefix": [prefix]}}  # S3 tests the key as s3:prefix


# --- the same stack in moto, read back through boto3 ------------------------------------------


MOTO_CLOUDFORMATION_LACKS = ("AWS::ApiGatewayV2::", "AWS::CloudWatch::Alarm", "AWS::S3::BucketPolicy")
API_ID = "fanoutapi"  # stands for the API moto cannot create


def for_moto_cloudformation(template: dict[str, Any]) -> dict[str, Any]:
    """Without what moto's CloudFormation cannot create; what referred to the API refers to a
    made-up API id instead (the permissions' SourceArn)."""
    template = copy.deepcopy(template)
    for name in [n for n, r in template["Resources"].items() if r["Type"].startswith(MOTO_CLOUDFORMATION_LACKS)]:
        del template["Resources"][name]
    template["Outputs"].pop("ApiUrl")
    text = json.dumps(template).replace('{"Ref": "FanoutApi"}', f'"{API_ID}"').replace("${FanoutApi}", API_ID)
    return json.loads(text)


def _zip(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def stack_in_moto(translated: dict[str, Any], env: str) -> Iterator[dict[str, str]]:
    """The translated stack created in moto; yields logical id -> physical id."""
    params = samconfig_parameters(env)
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}
    with pytest.MonkeyPatch.context() as patch, mock_aws(config={"iam": {"load_aws_managed_policies": True}}):
        for name, value in credentials.items():
            patch.setenv(name, value)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="artifacts")  # what `sam deploy` uploads first
        s3.put_object(Bucket="artifacts", Key="function.zip", Body=_zip({"app.py": "handler = None\n"}))
        s3.put_object(Bucket="artifacts", Key="layer.zip", Body=_zip({"python/fanout/__init__.py": ""}))
        s3.put_object(Bucket="artifacts", Key="worker.zip", Body=_zip({"app.py": "handler = None\n"}))
        template = for_moto_cloudformation(translated)
        cloudformation = boto3.client("cloudformation")
        cloudformation.create_stack(
            StackName=f"fanout-{env}",
            TemplateBody=json.dumps(template),
            Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()],
            Capabilities=["CAPABILITY_IAM"],
        )
        (stack,) = cloudformation.describe_stacks(StackName=f"fanout-{env}")["Stacks"]
        assert stack["StackStatus"] == "CREATE_COMPLETE", stack.get("StackStatusReason")
        physical = {
            r["LogicalResourceId"]: r["PhysicalResourceId"]
            for r in cloudformation.list_stack_resources(StackName=f"fanout-{env}")["StackResourceSummaries"]
        }
        resources = deployed(translated, params)
        # moto's CloudFormation creates roles without their managed policies: attach them through
        # IAM's API, where moto holds the AWS-managed policies' documents.
        iam = boto3.client("iam")
        for name, props in of_type(resources, "AWS::IAM::Role").items():
            for arn in props["ManagedPolicyArns"]:
                policy = arn["Fn::Sub"].replace("${AWS::Partition}", "aws")
                iam.attach_role_policy(RoleName=physical[name], PolicyArn=policy)
        # The alarms through CloudWatch's API, with the references CloudFormation would fill in.
        cloudwatch = boto3.client("cloudwatch")
        refs = {**physical, "FanoutApi": API_ID}
        for name, props in of_type(resources, "AWS::CloudWatch::Alarm").items():
            filled = json.loads(json.dumps(props), object_hook=lambda node: _filled(node, refs))
            cloudwatch.put_metric_alarm(AlarmName=f"fanout-{env}-{name}", **filled)
        yield physical


def _filled(node: dict[str, Any], refs: dict[str, str]) -> Any:
    """A Ref or a queue's QueueName as CloudFormation fills it in (a queue's physical id is its URL)."""
    if node.keys() == {"Ref"}:
        return refs[node["Ref"]]
    if node.keys() == {"Fn::GetAtt"} and node["Fn::GetAtt"][1] == "QueueName":
        return refs[node["Fn::GetAtt"][0]].rsplit("/", 1)[-1]
    return node


def test_moto_creates_the_functions_with_their_concurrency(stack_in_moto: dict[str, str], env: str) -> None:
    params = samconfig_parameters(env)
    client = boto3.client("lambda")
    for name in ALL_FUNCTIONS:
        function_name = stack_in_moto[f"{name}Function"]
        config = client.get_function_configuration(FunctionName=function_name)
        assert config["Runtime"] == "python3.13" and config["Handler"] == "app.handler"
        assert config["Role"].endswith(stack_in_moto[f"{ROLES[name]}FunctionRole"])
        if name not in FUNCTIONS:
            continue
        variables = config["Environment"]["Variables"]
        assert str(variables["FANOUT_MAX_CONCURRENCY"]) == params[f"{name}MaxConcurrency"]  # moto keeps the int
        reserved = client.get_function_concurrency(FunctionName=function_name).get("ReservedConcurrentExecutions")
        assert reserved == (int(params[f"{name}ReservedConcurrency"]) or None)
    (layer,) = client.list_layers()["Layers"]
    assert layer["LatestMatchingVersion"]["CompatibleRuntimes"] == ["python3.13"]


def test_moto_creates_log_groups_with_retention_and_least_privilege_roles(
    stack_in_moto: dict[str, str], env: str
) -> None:
    params = samconfig_parameters(env)
    groups = {
        g["logGroupName"]: g.get("retentionInDays") for g in boto3.client("logs").describe_log_groups()["logGroups"]
    }
    for name in ALL_FUNCTIONS:
        assert groups[f"/aws/lambda/{stack_in_moto[f'{name}Function']}"] == int(params["LogRetentionDays"])
    assert groups[f"/aws/vendedlogs/fanout-{env}/api-access"] == int(params["AccessLogRetentionDays"])
    iam = boto3.client("iam")
    role = iam.get_role(RoleName=stack_in_moto["ApiFunctionRole"])["Role"]
    (trust,) = role["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Principal"] == {"Service": ["lambda.amazonaws.com"]}
    assert iam.list_role_policies(RoleName=role["RoleName"])["PolicyNames"] == []
    attached = iam.list_attached_role_policies(RoleName=role["RoleName"])["AttachedPolicies"]
    assert {p["PolicyArn"] for p in attached} == {BASIC_EXECUTION, XRAY_WRITE}  # both environments trace
    for policy in attached:  # the AWS-managed documents as moto holds them: no wildcard action
        version = iam.get_policy(PolicyArn=policy["PolicyArn"])["Policy"]["DefaultVersionId"]
        document = iam.get_policy_version(PolicyArn=policy["PolicyArn"], VersionId=version)["PolicyVersion"]
        statements = document["Document"]["Statement"]
        actions = [a for s in statements for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])]
        assert actions and not [a for a in actions if a == "*" or a.endswith(":*")], policy["PolicyArn"]


def test_moto_alarms_watch_the_created_functions_and_notify_the_topic(stack_in_moto: dict[str, str]) -> None:
    (topic,) = [t["TopicArn"] for t in boto3.client("sns").list_topics()["Topics"]]
    assert topic == stack_in_moto["AlarmTopic"]
    alarms = boto3.client("cloudwatch").describe_alarms()["MetricAlarms"]
    assert len(alarms) == 19
    watched = {
        (alarm["MetricName"], alarm["Dimensions"][0]["Value"])
        for alarm in alarms
        if alarm.get("Namespace") == "AWS/Lambda"
    }
    (throttled,) = [alarm for alarm in alarms if alarm["AlarmName"].endswith("TargetThrottledAlarm")]
    assert [query["Id"] for query in throttled["Metrics"]] == ["sync", "gather", "semaphore", "batch", "worst"]
    assert watched == {
        (metric, stack_in_moto[f"{name}Function"])
        for metric in ("Errors", "Throttles", "Duration")
        for name in (*FUNCTIONS, "Jobs")
    } | {("Errors", stack_in_moto["WorkerFunction"])}
    assert all(alarm["AlarmActions"] == [topic] for alarm in alarms)


# --- the SAM CLI reads samconfig.toml as we do ---------------------------------------------------

SAM_READS_SAMCONFIG = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from samcli.cli.types import CfnParameterOverridesType
    from samcli.lib.config.samconfig import SamConfig

    config = SamConfig(Path(sys.argv[1]), "samconfig.toml")
    out = {}
    for env in sys.argv[2:]:
        deploy = dict(config.get_all(["deploy"], "parameters", env=env))
        deploy["parameter_overrides"] = CfnParameterOverridesType().convert(deploy["parameter_overrides"], None, None)
        out[env] = deploy
    print(json.dumps(out))
    """
)


@pytest.mark.sam
def test_the_sam_cli_reads_each_environment_as_these_tests_do() -> None:
    cli = os.environ.get("FANOUT_SAM_CLI")
    if not cli:
        pytest.skip("SAM CLI not found: run the tests with `make test`, which installs it")
    python = str(Path(cli).with_name("python"))
    done = subprocess.run(
        [python, "-c", SAM_READS_SAMCONFIG, str(ROOT), *ENVIRONMENTS], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    read = json.loads(done.stdout)
    for env in ENVIRONMENTS:
        assert read[env]["parameter_overrides"] == samconfig_parameters(env)
        assert read[env]["stack_name"] == f"fanout-{env}"
        assert read[env]["capabilities"] == "CAPABILITY_IAM"
        assert read[env]["region"] == REGION
        assert set(read[env]["parameter_overrides"]) <= set(load_template(TEMPLATE)["Parameters"])
