"""POST /batch against hostile input: every invalid body is a 4xx that names the field, never a 500.

The body goes through the real handler as API Gateway sends it; bodies that are not
JSON Python would write (NaN, 1e400, lone surrogates, deep nesting) are built as
raw text, since json.dumps would refuse or normalise them.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import lambda_context, load_event
from fanout_local.upstream import LocalUpstream


@pytest.fixture
def handler(upstream: LocalUpstream, import_handler: Any) -> Any:
    upstreams = {"up": {"url": upstream.url, "allow_http": True}}
    return import_handler(FANOUT_UPSTREAMS=json.dumps(upstreams)).handler


def post_raw(handler: Any, text: str, content_type: str | None = "application/json") -> tuple[int, dict[str, Any]]:
    event = copy.deepcopy(load_event("batch-http-api-v2.json"))
    event["body"] = text
    event["headers"].pop("content-type", None)
    if content_type is not None:
        event["headers"]["content-type"] = content_type
    event["headers"]["content-length"] = str(len(text.encode("utf-8", "surrogatepass")))
    response = handler(event, lambda_context())
    return response["statusCode"], json.loads(response["body"])


ITEM = '{"id": "a", "target": "up", "path": "/delay"}'


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('{"requests": [' + ITEM + '], "deadline_s": NaN}', "deadline_s: Input should be a finite number"),
        ('{"requests": [' + ITEM + '], "deadline_s": Infinity}', "deadline_s: Input should be a finite number"),
        ('{"requests": [' + ITEM + '], "tolerated_failure_percentage": -Infinity}', "tolerated_failure_percentage:"),
        ('{"requests": [' + ITEM + '], "concurrency": 1e400}', "concurrency: Input should be a finite number"),
        (
            '{"requests": [{"id": "a", "target": "up", "query": {"q": NaN}}]}',
            "query: Value error, 'q': numbers must be finite",
        ),
        (
            '{"requests": [{"id": "a", "target": "up", "query": {"q": 1e400}}]}',
            "query: Value error, 'q': numbers must be finite",
        ),
        (
            '{"requests": [{"id": "a", "target": "up", "json": {"price": NaN}}]}',
            "json: Value error, holds NaN, Infinity or a number too large for a double",
        ),
        (
            '{"requests": [{"id": "a", "target": "up", "json": [1e400]}]}',
            "json: Value error, holds NaN, Infinity or a number too large for a double",
        ),
        ("NaN", "body: the body must be a JSON object with a requests list, not a float"),
        ("1e400", "body: the body must be a JSON object with a requests list, not a float"),
    ],
)
def test_non_finite_numbers_are_a_422_naming_the_field(
    text: str, named: str, handler: Any, upstream: LocalUpstream
) -> None:
    status, body = post_raw(handler, text)
    assert status == 422
    assert named in body["message"]
    assert upstream.stats.requests == 0


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ('{"id": "\\ud800", "target": "up"}', "id"),
        ('{"id": "a", "target": "u\\udfff"}', "target"),
        ('{"id": "a", "target": "up", "path": "/x\\ud800"}', "path"),
        ('{"id": "a", "target": "up", "headers": {"accept": "\\ud800"}}', "headers"),
        ('{"id": "a", "target": "up", "headers": {"\\ud800": "x"}}', "headers"),
        ('{"id": "a", "target": "up", "query": {"q": "\\ud800"}}', "query"),
        ('{"id": "a", "target": "up", "query": {"\\ud800": "q"}}', "query"),
        ('{"id": "a", "target": "up", "idempotency_key": "k\\ud800"}', "idempotency_key"),
        ('{"id": "a", "target": "up", "method": "POST", "body": "\\udc00"}', "body"),
        ('{"id": "a", "target": "up", "method": "POST", "json": {"k": "\\ud800"}}', "json"),
        ('{"id": "a", "target": "up", "method": "POST", "json": {"\\ud800": 1}}', "json"),
    ],
)
def test_lone_surrogates_are_a_422_naming_the_field(
    item: str, field: str, handler: Any, upstream: LocalUpstream
) -> None:
    status, body = post_raw(handler, '{"requests": [' + item + "]}")
    assert status == 422
    (error,) = body["detail"]
    assert error["loc"] == ["body", "requests", 0]
    assert error["msg"] == (
        f"Value error, {field}: holds a lone UTF-16 surrogate (a \\ud800-\\udfff escape), which is not text"
    )
    assert upstream.stats.requests == 0


@pytest.mark.parametrize("depth", [990, 1000, 5000, 100_000])
def test_deep_nesting_is_a_4xx(depth: int, handler: Any) -> None:
    status, body = post_raw(handler, '{"requests": [' + ITEM + '], "x": ' + "[" * depth + "]" * depth + "}")
    assert status == 422
    assert body["message"].startswith(("body: the body nests arrays or objects too deeply", "x: Extra inputs"))


@pytest.mark.parametrize(("depth", "refused"), [(64, False), (65, True), (900, True)])
def test_deep_json_for_an_item_is_refused_naming_it(depth: int, refused: bool, handler: Any) -> None:
    deep = "[" * depth + "]" * depth
    status, body = post_raw(handler, '{"requests": [{"id": "a", "target": "up", "json": ' + deep + "}]}")
    if refused:
        assert status == 422
        assert body["detail"][0]["msg"] == "Value error, json: nests arrays or objects deeper than 64 levels"
    else:
        assert (status, body["responses"][0]["status"]) == (200, 404)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/json"])
def test_a_json_body_is_read_whatever_its_content_type(
    content_type: str | None, handler: Any, upstream: LocalUpstream
) -> None:
    status, body = post_raw(handler, '{"requests": [' + ITEM + "]}", content_type)
    assert (status, body["responses"][0]["status"]) == (200, 200)
    assert upstream.stats.requests == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "body: the body must be a JSON object with a requests list, not an array"),
        ('"requests"', "body: the body must be a JSON object with a requests list, not a str"),
        ("null", "body: the body must be a JSON object with a requests list, not a null"),
        ("42", "body: the body must be a JSON object with a requests list, not a int"),
        ("true", "body: the body must be a JSON object with a requests list, not a bool"),
        ("requests=1", "body: the body is not valid JSON: Expecting value: line 1 column 1 (char 0)"),
        ("", "body: the body is not valid JSON: Expecting value: line 1 column 1 (char 0)"),
        ('{"requests": [', "body: the body is not valid JSON: Expecting value: line 1 column 15 (char 14)"),
        ("{" + '"x": ' + "1" * 5000 + "}", "body: the body is not valid JSON: Exceeds the limit (4300 digits)"),
    ],
)
def test_a_body_that_is_no_json_object_says_so(text: str, message: str, handler: Any) -> None:
    status, body = post_raw(handler, text)
    assert status == 422
    assert body["message"].startswith(message)


def test_a_body_that_is_not_utf8_says_so(handler: Any) -> None:
    event = copy.deepcopy(load_event("batch-http-api-v2.json"))
    event["body"] = "/w=="  # base64 of 0xff
    event["isBase64Encoded"] = True
    response = handler(event, lambda_context())
    assert response["statusCode"] == 422
    assert json.loads(response["body"])["message"].startswith("body: the body is not UTF-8 text (byte 0")


def test_an_error_report_shows_hostile_input_safely(handler: Any) -> None:
    """The 422's own writing never fails: NaN, surrogates and deep values are shown as bounded reprs."""
    deep = "[" * 500 + "]" * 500
    text = '{"requests": [], "deadline_s": ' + deep + ', "concurrency": NaN, "fail_fast": "\\udfff"}'
    status, body = post_raw(handler, text)
    assert status == 422
    assert len(json.dumps(body)) < 5000
    inputs = {tuple(map(str, error["loc"]))[-1]: error["input"] for error in body["detail"]}
    assert inputs == {"requests": "[]", "deadline_s": "[[[...]]]", "concurrency": "nan", "fail_fast": "'\\udfff'"}


# --- a schema fuzz: any body at all gets an answer, and an invalid one a 4xx with a message ---------

json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters() | st.sampled_from(["\ud800", "\udfff"]), max_size=8),  # lone surrogates too
)
json_values = st.recursive(
    json_leaves, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
)
fields = st.fixed_dictionaries(
    {},
    optional={
        "id": json_values | st.text(min_size=1, max_size=8),
        "method": json_values | st.sampled_from(["GET", "POST", "BREW"]),
        "target": json_values | st.just("up"),
        "path": json_values | st.sampled_from(["/delay", "/%2e%2e/x", "/a%zz", "/../x"]),
        "query": json_values,
        "headers": json_values,
        "json": json_values,
        "body": json_values,
        "idempotency_key": json_values,
        "surprise": json_values,
    },
)
bodies = (
    st.fixed_dictionaries(
        {},
        optional={
            "requests": st.lists(fields, max_size=3) | json_values,
            "strategy": json_values | st.sampled_from(["sync", "gather", "semaphore"]),
            "concurrency": json_values,
            "deadline_s": json_values,
            "fail_fast": json_values,
            "tolerated_failure_percentage": json_values,
        },
    )
    | json_values
)


def _text_of(value: Any) -> str:
    """JSON text as a hostile client writes it: NaN, Infinity and lone surrogates included."""
    return json.dumps(value, allow_nan=True, ensure_ascii=True)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, content_type=st.sampled_from([None, "application/json", "text/plain"]))
def test_any_body_gets_an_answer_and_an_invalid_one_a_4xx_with_a_message(
    body: Any, content_type: str | None, shared_handler: Any
) -> None:
    status, answer = post_raw(shared_handler, _text_of(body), content_type)
    assert status in (200, 422, 502)
    if status == 422:
        assert answer["message"] and answer["detail"]
        assert all(isinstance(error["loc"], list) and error["msg"] for error in answer["detail"])
    else:
        assert len(answer["responses"]) == len(body["requests"])


@pytest.fixture
def shared_handler(upstream: LocalUpstream, import_handler: Any) -> Any:
    upstreams = {"up": {"url": upstream.url, "allow_http": True}}
    return import_handler(
        FANOUT_UPSTREAMS=json.dumps(upstreams), FANOUT_DEADLINE_S="2", FANOUT_REQUEST_TIMEOUT_S="1"
    ).handler


@pytest.mark.parametrize(
    "value", ["a\\r\\nx-injected: 1", "a\\nb", "a\\u0000b", "a\\u0007b", "a\\u007fb", "\\u001b[31m"]
)
def test_a_control_character_in_a_header_value_is_a_422_naming_the_header(
    value: str, handler: Any, upstream: LocalUpstream
) -> None:
    """HTTP field values are visible characters, spaces and tabs (RFC 9110, 5.5): anything else is the caller's
    mistake, named before any request leaves, not an item failed by the client library's ValueError."""
    item = '{"id": "a", "target": "up", "headers": {"accept": "' + value + '"}}'
    status, body = post_raw(handler, '{"requests": [' + item + "]}")
    assert status == 422
    (error,) = body["detail"]
    assert error["loc"] == ["body", "requests", 0, "headers", "accept"]
    assert error["msg"] == "Value error, must not contain control characters (only visible characters, spaces and tabs)"
    assert upstream.stats.requests == 0


@pytest.mark.parametrize(
    ("value", "sent"),
    [("text/html;\\tq=0.9", "text/html;\tq=0.9"), ("caf\\u00e9", "café"), ("\\u4e2d", "中"), (" padded ", " padded ")],
)
def test_tabs_and_text_beyond_ascii_in_a_header_value_are_sent(value: str, sent: str, handler: Any) -> None:
    """Beyond ASCII a value goes out as UTF-8 (obs-text); the upstream reads its bytes as latin-1."""
    item = '{"id": "a", "target": "up", "path": "/echo", "headers": {"accept": "' + value + '"}}'
    status, body = post_raw(handler, '{"requests": [' + item + "]}")
    (answer,) = body["responses"]
    assert (status, answer["status"]) == (200, 200)
    assert answer["body"]["headers"]["accept"] == sent.encode().decode("latin-1")
