"""The /batch answer's sizes, checked against the encoder Lambda's runtime client posts it with.

`fanout.batch_response` measures every item as the runtime will post it (its JSON escaped
once more) so that an answer within FANOUT_MAX_RESPONSE_BYTES is within Lambda's limit too.
These properties hold it to awslambdaric's own marshaller, the code that does the posting.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fanout.batch import ItemReport
from fanout.batch_response import ENVELOPE_BYTES, MINIMAL_ITEM_BYTES, _Item, fits, posted_size, render
from fanout.settings import Settings
from fanout.strict_json import loads_upstream
from fanout.transports import UpstreamResponse


@pytest.fixture(scope="module")
def runtime_encode() -> Any:
    """awslambdaric's encoder for an invocation's response, built as on Lambda's python3.13."""
    ric = os.environ.get("FANOUT_LAMBDA_RIC", "")
    if not (Path(ric) / "awslambdaric").is_dir():
        pytest.skip("awslambdaric not installed: run the tests with `make test`")
    with pytest.MonkeyPatch.context() as patch:  # the encoder reads the variable once, when it is made
        patch.syspath_prepend(ric)
        patch.setenv("AWS_EXECUTION_ENV", "AWS_Lambda_python3.13")
        marshaller = importlib.import_module("awslambdaric.lambda_runtime_marshaller")
        return marshaller.LambdaMarshaller().jsonEncoder.encode


def bytes_posted(encode: Any, text: str) -> int:
    """Bytes `text` adds to the runtime's post as a string value, its two quotes left out."""
    return len(encode({"body": text}).encode("utf-8")) - len(encode({"body": ""}).encode("utf-8"))


# Text with what escaping treats differently: quotes, backslashes, control characters,
# U+2028 and U+2029 (which simplejson escapes only for HTML, not as the runtime posts), DEL, non-ASCII.
tricky_text = st.text(
    st.one_of(
        st.sampled_from('"\\\x00\x01\x08\t\n\x0c\r\x1f\x7f\u2028\u2029/é€😀'),
        st.characters(codec="utf-8"),
    ),
    max_size=40,
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | tricky_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(tricky_text, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300)
@given(json_values)
def test_posted_size_is_what_the_runtime_posts_for_a_json_text(runtime_encode: Any, value: Any) -> None:
    text = json.dumps(value, ensure_ascii=False)
    assert posted_size(text) == bytes_posted(runtime_encode, text)


headers = st.dictionaries(st.sampled_from(["content-type", "x-note", "etag"]), tricky_text, max_size=3)
bodies = st.one_of(
    st.binary(max_size=300),
    st.integers(0, 3000).map(lambda n: b'"' * n),  # what doubles when posted
    tricky_text.map(lambda text: text.encode("utf-8")),
    json_values.map(lambda value: json.dumps(value, ensure_ascii=False).encode("utf-8")),
)
responses = st.builds(
    UpstreamResponse,
    status=st.integers(100, 599),
    headers=st.one_of(headers, st.just({"content-type": "application/json"})),
    body=bodies,
    truncated=st.booleans(),
)
outcomes = st.one_of(
    st.fixed_dictionaries({"response": responses}),
    st.fixed_dictionaries({"error": st.sampled_from(["ReadTimeout", "ConnectError"]), "message": tricky_text}),
    st.fixed_dictionaries({"skipped": st.sampled_from(["deadline", "fail_fast"])}),
)


@st.composite
def calls(draw: st.DrawFn) -> tuple[list[ItemReport], float]:
    """Reports with distinct ids, and where the limit falls between what fits at least (0) and all of it (1)."""
    ids = draw(st.lists(tricky_text.filter(bool), min_size=1, max_size=8, unique=True))
    reports = [ItemReport(id=id_, attempts=1, elapsed_s=0.01, **draw(outcomes)) for id_ in ids]
    return reports, draw(st.floats(0, 1))


@settings(max_examples=300)
@given(calls())
def test_an_answer_that_fits_is_within_the_limit_as_the_runtime_posts_it(
    runtime_encode: Any, call: tuple[list[ItemReport], float]
) -> None:
    reports, where = call
    ids = [report.id for report in reports]
    summary = {"succeeded": 1, "failed": 0}
    least = ENVELOPE_BYTES + sum(posted_size(json.dumps(id_, ensure_ascii=False)) + MINIMAL_ITEM_BYTES for id_ in ids)
    whole = ENVELOPE_BYTES + bytes_posted(runtime_encode, render(reports, summary, 10**9).body.decode("utf-8"))
    max_bytes = least + round(where * max(whole - least, 0))
    assert fits(ids, max_bytes)
    text = render(reports, summary, max_bytes).body.decode("utf-8")
    assert ENVELOPE_BYTES + bytes_posted(runtime_encode, text) <= max_bytes
    assert [item["id"] for item in json.loads(text)["responses"]] == ids


def test_an_item_with_everything_dropped_is_within_the_bound_fits_counts() -> None:
    """The largest an item can be once its body, headers and message are dropped: the longest error
    name the service uses and then some, the most attempts, an elapsed time of a whole Lambda run."""
    attempts = max(getattr(bound, "le", 0) for bound in Settings.model_fields["max_attempts"].metadata)
    worst = [
        ItemReport(
            id="",
            attempts=attempts,
            elapsed_s=900.0,
            response=UpstreamResponse(599, {"x-note": "a" * 500}, b'"' * 500, truncated=True),
        ),
        ItemReport(id="", attempts=attempts, elapsed_s=900.0, error="E" * 64, message='"' * 500),
        ItemReport(id="", attempts=attempts, elapsed_s=900.0, skipped="fail_fast"),
    ]
    for report in worst:
        item = _Item(report)
        for part in ("body", "headers", "message"):
            if item.droppable(part):
                item.drop(part)
        assert item.size - posted_size('""') + 1 <= MINIMAL_ITEM_BYTES  # the id aside, its comma counted


def _json_loads_or_error(data: bytes) -> Any:
    def refuse(name: str) -> Any:
        raise ValueError(name)

    try:
        return json.loads(data, parse_constant=refuse)
    except (ValueError, RecursionError) as exc:
        return type(exc)


@settings(max_examples=300)
@given(
    st.one_of(
        st.binary(max_size=60),
        json_values.map(lambda value: json.dumps(value, ensure_ascii=False).encode("utf-8")),
        json_values.map(lambda value: json.dumps(value).encode("utf-16")),
        st.sampled_from([b"NaN", b"[Infinity]", b"-Infinity", b"\xef\xbb\xbf[1]", b"1e400", b'"\\ud800"']),
    )
)
def test_an_upstream_body_is_read_as_json_loads_reads_it_but_for_nan_and_infinity(data: bytes) -> None:
    expected = _json_loads_or_error(data)
    try:
        got = loads_upstream(data)
    except ValueError:
        assert expected in (ValueError, json.JSONDecodeError, UnicodeDecodeError, RecursionError)
        return
    assert json.dumps(got) == json.dumps(expected)  # NaN-free, so equal as written
