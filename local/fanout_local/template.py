"""Read template.yaml the way `sam local start-api` does: functions, their routes, their environment.

Only what the local gateway needs: each `AWS::Serverless::Function` with its
handler, code directory, routes and environment (Globals merged in, `!Ref`/`!Sub`
of Parameters resolved from their defaults or from overrides). Routes come from
HttpApi events or from `AWS::ApiGatewayV2::Route` resources whose target is an
integration with the function. Variables set under a Condition are left out:
they switch on what only a deploy adds (the OpenTelemetry layer's wrapper).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_ROUTE = "$default"


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # as in the template, e.g. /async_sem/{n}/{k}

    @property
    def route_key(self) -> str:
        return DEFAULT_ROUTE if self.is_default else f"{self.method} {self.path}"

    @property
    def is_default(self) -> bool:
        """API Gateway's `$default` route: whatever no other route takes."""
        return self.path == DEFAULT_ROUTE

    def match(self, method: str, path: str) -> dict[str, str] | None:
        """The path parameters if this route takes the request, else None."""
        if self.is_default:
            return {}
        if self.method not in (method, "ANY"):
            return None
        pattern = re.sub(r"\\\{(\w+)\\\+\\\}", r"(?P<\1>.+)", re.escape(self.path))
        pattern = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", pattern)
        found = re.fullmatch(pattern, path)
        return found.groupdict() if found else None


@dataclass(frozen=True)
class QueueSource:
    """An SQS event source of a function, as its event source mapping would poll it."""

    queue: str  # the queue's logical id in the template
    batch_size: int
    maximum_concurrency: int  # ScalingConfig.MaximumConcurrency (AWS's least is 2)
    report_failures: bool  # FunctionResponseTypes: ReportBatchItemFailures


@dataclass(frozen=True)
class LocalFunction:
    name: str
    handler: str  # module.attribute
    code_dir: Path
    timeout_s: float
    memory_mb: int  # MemorySize: what Lambda tells the function as AWS_LAMBDA_FUNCTION_MEMORY_SIZE
    routes: tuple[Route, ...]
    environment: dict[str, str]
    queues: tuple[QueueSource, ...] = ()


class _CloudFormationLoader(yaml.SafeLoader):
    """Reads `!Ref X` as {"Ref": X}, `!Sub s` as {"Fn::Sub": s}, and so on."""


def _tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {name: value}


_CloudFormationLoader.add_multi_constructor("!", _tag)


def load_template(path: Path) -> dict[str, Any]:
    with path.open() as file:
        return yaml.load(file, Loader=_CloudFormationLoader)


def parameter_values(template: Mapping[str, Any], overrides: Mapping[str, str]) -> dict[str, str]:
    """Each Parameter's value: the override of the same name if given, else its Default."""
    values = {}
    for name, spec in template.get("Parameters", {}).items():
        if name in overrides:
            values[name] = overrides[name]
        elif "Default" in spec:
            values[name] = str(spec["Default"])
    return values


def _api_routes(resources: Mapping[str, Any]) -> dict[str, list[Route]]:
    """Function name -> its routes, from AWS::ApiGatewayV2::Route -> Integration -> function.

    A route written once per AuthMode (each under its condition) is one route here: the local
    gateway authorizes nothing, so both spell the same thing.
    """
    routes: dict[str, list[Route]] = {}
    for resource in resources.values():
        if resource.get("Type") != "AWS::ApiGatewayV2::Route":
            continue
        props = resource["Properties"]
        key = props["RouteKey"]
        method, path = ("ANY", DEFAULT_ROUTE) if key == DEFAULT_ROUTE else key.split(" ", 1)
        target = props["Target"]["Fn::Sub"] if isinstance(props["Target"], dict) else props["Target"]
        integration = resources[re.fullmatch(r"integrations/\$\{(\w+)\}", target).group(1)]  # type: ignore[union-attr]
        uri = integration["Properties"]["IntegrationUri"]
        function = (uri.get("Fn::GetAtt") or "").split(".")[0] if isinstance(uri, dict) else ""
        route = Route(method=method.upper(), path=path)
        if route not in routes.setdefault(function, []):
            routes[function].append(route)
    return routes


#: What a resource's Ref and Fn::GetAtt are locally (fanout_local.stack fills it): {"JobsTable": {"Ref": ...}}.
ResourceValues = Mapping[str, Mapping[str, str]]
STACK_RESOURCES = ("AWS::DynamoDB::Table", "AWS::S3::Bucket", "AWS::SQS::Queue")


def placeholders(template: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Each table, bucket and queue named by its logical id, as the SAM CLI leaves a Ref it cannot
    resolve: for reading the functions without creating anything."""
    return {
        name: {"Ref": name, "Arn": f"arn:aws:local:::{name}", "QueueName": name}
        for name, resource in template.get("Resources", {}).items()
        if resource.get("Type") in STACK_RESOURCES
    }


def local_functions(
    template: Mapping[str, Any], root: Path, overrides: Mapping[str, str], resources: ResourceValues | None = None
) -> list[LocalFunction]:
    params = parameter_values(template, overrides)
    values = Values(params, resources or {})
    defaults = template.get("Globals", {}).get("Function", {})
    api_routes = _api_routes(template.get("Resources", {}))
    functions = []
    for name, resource in template.get("Resources", {}).items():
        if resource.get("Type") != "AWS::Serverless::Function":
            continue
        props = {**defaults, **resource.get("Properties", {})}
        variables = {
            **defaults.get("Environment", {}).get("Variables", {}),
            **resource.get("Properties", {}).get("Environment", {}).get("Variables", {}),
        }
        routes = tuple(
            Route(method=event["Properties"]["Method"].upper(), path=event["Properties"]["Path"])
            for event in resource.get("Properties", {}).get("Events", {}).values()
            if event.get("Type") == "HttpApi"
        ) + tuple(api_routes.get(name, []))
        functions.append(
            LocalFunction(
                name=name,
                handler=props["Handler"],
                code_dir=root / props["CodeUri"],
                timeout_s=float(values.resolve(props.get("Timeout", 3), name)),
                memory_mb=int(values.resolve(props.get("MemorySize", 128), name)),
                routes=routes,
                environment={
                    key: values.resolve(value, name) for key, value in variables.items() if not _deploy_only(value)
                },
                queues=_queue_sources(resource, values, name),
            )
        )
    return functions


def _queue_sources(resource: Mapping[str, Any], values: Values, function: str) -> tuple[QueueSource, ...]:
    sources = []
    for event in resource.get("Properties", {}).get("Events", {}).values():
        if event.get("Type") != "SQS":
            continue
        props = event["Properties"]
        arn = props["Queue"]["Fn::GetAtt"]  # !GetAtt Queue.Arn
        logical_id = arn.split(".")[0] if isinstance(arn, str) else arn[0]
        scaling = props.get("ScalingConfig", {}).get("MaximumConcurrency", 2)
        sources.append(
            QueueSource(
                queue=logical_id,
                batch_size=int(values.resolve(props.get("BatchSize", 10), function)),
                maximum_concurrency=int(values.resolve(scaling, function)),
                report_failures="ReportBatchItemFailures" in props.get("FunctionResponseTypes", []),
            )
        )
    return tuple(sources)


def _deploy_only(value: Any) -> bool:
    """A variable chosen by a Condition (the tracing layer's wrapper): it needs what only a deploy adds."""
    return isinstance(value, dict) and "Fn::If" in value


class Values:
    """Parameters and resources as their Ref and Fn::GetAtt read locally."""

    def __init__(self, params: Mapping[str, str], resources: ResourceValues) -> None:
        self.params = params
        self.resources = resources

    def resolve(self, value: Any, function: str) -> str:
        if isinstance(value, dict) and "Ref" in value:
            return self._ref(value["Ref"], function)
        if isinstance(value, dict) and "Fn::GetAtt" in value:
            target = value["Fn::GetAtt"]
            logical_id, attribute = target.split(".", 1) if isinstance(target, str) else target
            return self._resource(logical_id, function)[attribute]
        if isinstance(value, dict) and "Fn::Sub" in value:
            return re.sub(r"\$\{([\w.]+)\}", lambda m: self._sub(m.group(1), function), value["Fn::Sub"])
        if isinstance(value, dict):
            raise ValueError(f"{function}: cannot resolve {value} locally")
        return str(value)

    def _sub(self, name: str, function: str) -> str:
        if "." in name:
            return self.resolve({"Fn::GetAtt": name}, function)
        return self._ref(name, function)

    def _ref(self, name: str, function: str) -> str:
        if name in self.params:
            return self.params[name]
        if name in self.resources:
            return self.resources[name]["Ref"]
        raise KeyError(f"{function}: parameter {name} has no default; set it in the environment as {name}=...")

    def _resource(self, logical_id: str, function: str) -> Mapping[str, str]:
        if logical_id not in self.resources:
            raise KeyError(f"{function}: {logical_id} is not a resource the local stack creates")
        return self.resources[logical_id]
