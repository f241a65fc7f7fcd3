"""The `fanout` CLI's SigV4 signatures for a deployed API with AuthMode=IAM, checked as API Gateway
checks them: the signature is computed again, by the steps of AWS's published algorithm written
out here (not botocore's code), from the request as the server received it.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import pytest

from fanout_cli.main import Api

KEY_ID, SECRET = "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"


class Recorder(http.server.BaseHTTPRequestHandler):
    seen: ClassVar[list[dict[str, Any]]] = []

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        self.seen.append({"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body})
        data = json.dumps({"job_id": "j1"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = _answer

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def api_server() -> Iterator[str]:
    Recorder.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)  # stops in 20 ms, not 0.5 s
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/prod/"
    server.shutdown()
    server.server_close()


def expected_signature(seen: dict[str, Any], *, region: str, service: str = "execute-api") -> str:
    """AWS Signature Version 4, step by step, from what arrived."""
    authorization = seen["headers"]["Authorization"]
    algorithm, _, fields = authorization.partition(" ")
    assert algorithm == "AWS4-HMAC-SHA256"
    parts = dict(part.strip().split("=", 1) for part in fields.split(","))
    signed = parts["SignedHeaders"].split(";")
    headers = {name.lower(): " ".join(value.split()) for name, value in seen["headers"].items()}
    path, _, query = seen["path"].partition("?")
    canonical = "\n".join(
        [
            seen["method"],
            path,
            query,
            "".join(f"{name}:{headers[name]}\n" for name in signed),
            ";".join(signed),
            hashlib.sha256(seen["body"]).hexdigest(),
        ]
    )
    stamp = headers["x-amz-date"]
    scope = f"{stamp[:8]}/{region}/{service}/aws4_request"
    assert parts["Credential"] == f"{KEY_ID}/{scope}"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + SECRET).encode()
    for step in (stamp[:8], region, service, "aws4_request"):
        key = hmac.new(key, step.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-2")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "jobs", {"upload_id": "a" * 32, "concurrency": 5}),
        ("GET", "jobs/j1", None),
        ("DELETE", "jobs/j1", None),
    ],
)
def test_a_signed_call_carries_a_valid_sigv4_signature(
    api_server: str, credentials: None, method: str, path: str, body: Any
) -> None:
    assert Api(api_server, sign=True).call(method, path, body) == {"job_id": "j1"}
    (seen,) = Recorder.seen
    assert seen["path"] == f"/prod/{path}"
    signature = seen["headers"]["Authorization"].rsplit("Signature=", 1)[1]
    assert signature == expected_signature(seen, region="eu-west-2")
    assert "host" in seen["headers"]["Authorization"].split("SignedHeaders=")[1].split(",")[0].split(";")


def test_a_signature_over_another_body_does_not_verify(api_server: str, credentials: None) -> None:
    """The control: the check above does fail when what arrived is not what was signed."""
    Api(api_server, sign=True).call("POST", "jobs", {"upload_id": "a" * 32})
    (seen,) = Recorder.seen
    signature = seen["headers"]["Authorization"].rsplit("Signature=", 1)[1]
    assert signature != expected_signature({**seen, "body": seen["body"] + b" "}, region="eu-west-2")
    tampered = {**seen, "headers": {**seen["headers"], "Content-Type": "text/plain"}}
    assert signature != expected_signature(tampered, region="eu-west-2")


@pytest.mark.parametrize(
    ("url", "token", "signs", "region"),
    [
        ("https://abc123.execute-api.eu-west-2.amazonaws.com/prod", None, True, "eu-west-2"),
        ("https://abc123.execute-api.eu-west-2.amazonaws.com/prod", "a.jwt.token", False, None),
        ("http://127.0.0.1:3000", None, False, None),
    ],
)
def test_deployed_apis_are_signed_in_their_own_region_and_local_ones_are_not(
    monkeypatch: pytest.MonkeyPatch, url: str, token: str | None, signs: bool, region: str | None
) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    api = Api(url, token=token)
    assert (api.sign, api.region if signs else None) == (signs, region)


def test_a_signed_call_without_credentials_says_so(api_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(SystemExit, match="no AWS credentials were found"):
        Api(api_server, sign=True).call("GET", "jobs/j1")
    assert Recorder.seen == []
