"""The AWS the jobs need, on a laptop: moto in server mode (S3, SQS, DynamoDB), embedded in this process.

`make run` starts it and creates in it what template.yaml declares (the job table, the
buckets, the queues with their redrive policy), named `fanout-local-<LogicalId>`; what
a resource's Ref and Fn::GetAtt are here then fills the functions' environment, as
CloudFormation fills it on AWS. The functions reach it through AWS_ENDPOINT_URL: their
boto3 code is the code that runs on AWS.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import boto3

from fanout_local.template import Values

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "local", "AWS_SECRET_ACCESS_KEY": "local", "AWS_DEFAULT_REGION": REGION}
TABLE, BUCKET, QUEUE = "AWS::DynamoDB::Table", "AWS::S3::Bucket", "AWS::SQS::Queue"


class OneDynamoDBRequestAtATime:
    """DynamoDB applies each request atomically; moto does not. Two updates at once can lose an
    ADD, and a cancelled transaction puts back the whole table as it was when it began, undoing
    what other requests wrote meanwhile (moto 5.2.5): the job counts of chunks that finish
    together would drift and a job would never end. So DynamoDB requests run one at a time
    here; SQS and S3 do not wait behind them (a long poll holds its request for seconds)."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not environ.get("HTTP_X_AMZ_TARGET", "").startswith("DynamoDB_"):
            return self.app(environ, start_response)
        with self.lock:
            return self.app(environ, start_response)


class PutBodiesAsSent:
    """S3 keeps a PUT's bytes whatever its Content-Type says; moto (5.2.5, through Flask) reads a form
    type's body as form fields. `curl --data-binary` says application/x-www-form-urlencoded: its upload
    was kept as an empty file (a job of none of its items), and a byte that is not UTF-8 left the PUT
    unanswered. So a PUT's body reaches moto as application/octet-stream."""

    FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") == "PUT" and environ.get("CONTENT_TYPE", "").lower().startswith(
            self.FORM_TYPES
        ):
            environ = {**environ, "CONTENT_TYPE": "application/octet-stream"}
        return self.app(environ, start_response)


class LocalStack:
    """moto's server on 127.0.0.1:`port` (0: a free port), and the template's resources in it."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"LocalStack({self.endpoint})"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        # What moto's ThreadedMotoServer serves, with DynamoDB made atomic; only `make run` and
        # the tests import flask and werkzeug.
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per AWS call on the console
        app = PutBodiesAsSent(OneDynamoDBRequestAtATime(DomainDispatcherApplication(create_backend_app)))
        self._server = make_server("127.0.0.1", self.port, app, threaded=True, request_handler=MotoRequestHandler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="moto", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()

    def environment(self) -> dict[str, str]:
        """What a function needs to reach this stack with unchanged boto3 code."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint}

    def client(self, service: str) -> Any:
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )

    def create(self, template: Mapping[str, Any], params: Mapping[str, str]) -> dict[str, dict[str, str]]:
        """Create the template's tables, buckets and queues (a queue's dead-letter queue first); what
        each one's Ref and attributes are."""
        created: dict[str, dict[str, str]] = {}
        values = Values(params, created)
        resources = template.get("Resources", {})
        order = sorted(resources.items(), key=lambda pair: "RedrivePolicy" in pair[1].get("Properties", {}))
        for logical_id, resource in order:
            kind, props = resource.get("Type"), resource.get("Properties", {})
            name = f"fanout-local-{logical_id}"
            if kind == TABLE:
                created[logical_id] = self._table(name, props)
            elif kind == BUCKET:
                created[logical_id] = self._bucket(name.lower())
            elif kind == QUEUE:
                created[logical_id] = self._queue(name, props, values, logical_id)
        return created

    def _table(self, name: str, props: Mapping[str, Any]) -> dict[str, str]:
        dynamodb = self.client("dynamodb")
        dynamodb.create_table(
            TableName=name,
            KeySchema=props["KeySchema"],
            AttributeDefinitions=props["AttributeDefinitions"],
            BillingMode=props.get("BillingMode", "PAY_PER_REQUEST"),
        )
        ttl = props.get("TimeToLiveSpecification")
        if ttl:
            dynamodb.update_time_to_live(TableName=name, TimeToLiveSpecification=ttl)
        return {"Ref": name, "Arn": f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/{name}"}

    def _bucket(self, name: str) -> dict[str, str]:
        self.client("s3").create_bucket(Bucket=name)
        return {"Ref": name, "Arn": f"arn:aws:s3:::{name}"}

    def _queue(self, name: str, props: Mapping[str, Any], values: Values, logical_id: str) -> dict[str, str]:
        attributes = {}
        for key in ("VisibilityTimeout", "MessageRetentionPeriod"):
            if key in props:
                attributes[key] = values.resolve(props[key], logical_id)
        if "RedrivePolicy" in props:
            redrive = props["RedrivePolicy"]
            attributes["RedrivePolicy"] = json.dumps(
                {
                    "deadLetterTargetArn": values.resolve(redrive["deadLetterTargetArn"], logical_id),
                    "maxReceiveCount": int(values.resolve(redrive["maxReceiveCount"], logical_id)),
                }
            )
        url = self.client("sqs").create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
        return {"Ref": url, "Arn": f"arn:aws:sqs:{REGION}:{ACCOUNT}:{name}", "QueueName": name}
