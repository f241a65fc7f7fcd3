"""What a fanout function may be invoked with: API Gateway requests, and nothing else.

Mangum fails on an event it cannot place with an error that names its own internals
(`null` gave a TypeError). A function wired to the wrong source, or invoked by hand
with a test event, should instead say what it expects. It raises, rather than
answering: an SQS or S3 trigger that got an answer would count its records as done.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

Handler = Callable[[Any, Any], Any]
EXPECTED = "an API Gateway request (HTTP API payload format 2.0, or a REST API proxy event)"


class UnsupportedEvent(Exception):
    """The function was invoked with an event that is not an API Gateway request."""


def is_api_gateway_request(event: Any) -> bool:
    if not isinstance(event, dict) or not isinstance(event.get("requestContext"), dict):
        return False
    if event.get("version") == "2.0":
        return isinstance(event["requestContext"].get("http"), dict)
    return isinstance(event.get("httpMethod"), str)


def describe(event: Any) -> str:
    """A few words on what an event is, for the error (never its contents)."""
    if event is None:
        return "null"
    if isinstance(event, list):
        return "a JSON array"
    if not isinstance(event, dict):
        return f"a JSON {type(event).__name__}"
    records = event.get("Records")
    if isinstance(records, list) and records and isinstance(records[0], dict):
        source = records[0].get("eventSource") or records[0].get("EventSource") or "unknown"
        return f"an event of {source} records"
    if not event:
        return "an empty object"
    return f"an object with keys {', '.join(sorted(map(str, event))[:6])}"


def api_gateway_requests_only(handler: Handler) -> Handler:
    """`handler`, refusing any event that is not an API Gateway request with an UnsupportedEvent."""

    @functools.wraps(handler)
    def checked(event: Any, context: Any) -> Any:
        if not is_api_gateway_request(event):
            raise UnsupportedEvent(f"this function expects {EXPECTED}; it was invoked with {describe(event)}")
        return handler(event, context)

    return checked
