"""The /batch answer: one JSON object per item, the whole of it within what Lambda can post.

Lambda's runtime client posts the handler's result, `{"statusCode": ..., "body":
"<this answer>"}`, as JSON once more (awslambdaric's simplejson encoder,
`ensure_ascii=False`): every `"` and `\\` of the answer is escaped a second time, so
a body of quotes doubles. An answer measured before that can pass the limit and
still break Lambda's 6 MB, and then the caller gets a 502 and nothing. So every
item is measured as it will be posted (`posted_size`), and while the sum is over
FANOUT_MAX_RESPONSE_BYTES the largest parts go first: bodies, then response
headers, then error messages, each replaced by a marker (`body_dropped`,
`headers_dropped`, `message_dropped`). What stays whatever happens: each item's id
and how it ended. `fits` tells, before any work, whether even that
much fits for a call's ids.

An upstream body is parsed JSON when it is JSON that can be written back, else
UTF-8 text, else base64: a body with NaN, a lone surrogate or 50,000 levels of
nesting comes back as text, never as a 500.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from fanout.batch import ItemReport
from fanout.strict_json import loads_upstream

#: Response headers never passed back: hop-by-hop, and cookies meant for this service.
DROPPED_RESPONSE_HEADERS = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "te", "trailer", "transfer-encoding", "upgrade", "set-cookie"}
)
#: What the runtime posts besides the body: Mangum's statusCode, headers and flags, with room to spare.
ENVELOPE_BYTES = 1024
#: An item once everything droppable is dropped, ids aside, as posted (test_batch_response checks the bound).
MINIMAL_ITEM_BYTES = 320
MAX_MESSAGE_CHARS = 500


def posted_size(text: str) -> int:
    """Bytes a JSON text takes inside the invocation response the runtime posts (without the quotes around it).

    A JSON text holds no raw control character (they are escaped already), so posting it escapes only
    its `"` and `\\`, one byte more each: counted, not written (test_batch_response holds this to the
    runtime's own encoder). Raises UnicodeEncodeError (a ValueError) if `text` holds a lone surrogate:
    it cannot be posted at all.
    """
    return len(text.encode("utf-8")) + text.count('"') + text.count("\\")


def fits(ids: Sequence[str], max_bytes: int) -> bool:
    """Whether the answer to a call with these ids fits `max_bytes` once every droppable part is dropped."""
    least = ENVELOPE_BYTES + sum(posted_size(json.dumps(id_, ensure_ascii=False)) for id_ in ids)
    return least + MINIMAL_ITEM_BYTES * len(ids) <= max_bytes


@dataclass
class _Item:
    """One item's JSON object, its text, and the bytes it adds to the posted response."""

    report: ItemReport
    fields: dict[str, Any] = field(init=False)
    text: str = field(init=False)
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.fields = _fields(self.report)
        self.measure()

    def measure(self) -> None:
        self.text, self.size = _written(self.fields, self.report, posted_size)

    def drop(self, part: str) -> None:
        if part == "body":
            self.fields.update(body=None, body_dropped=True)
            self.fields.pop("encoding", None)
        elif part == "headers":
            self.fields.update(headers=None, headers_dropped=True)
        else:
            self.fields["error"].update(message=None, message_dropped=True)
        self.measure()

    def droppable(self, part: str) -> bool:
        if part == "message":
            return bool(self.fields.get("error", {}).get("message"))
        return bool(self.fields.get(part))


def item_line(report: ItemReport, **first: Any) -> str:
    """One item's JSON object on one line (a job's results), the `first` fields ahead of it.

    A body that writing would make longer than its base64 goes as base64: text whose escapes take
    six bytes a control character, JSON whose numbers are written back longer (`1e15` in 18
    bytes). A line is then never much more than its body, so a chunk's results file is bounded
    by its bodies' cap whatever an upstream sends."""
    fields = {**first, **_fields(report)}
    line, size = _written(fields, report, _utf8_size)
    response = report.response
    if response is not None and fields.get("body") is not None and _body_past_base64(fields, size, response.body):
        fields.update(_decode_body(response.body, "", response.truncated, force="base64"))
        line, _ = _written(fields, report, _utf8_size)
    return line


def _written(fields: dict[str, Any], report: ItemReport, measure: Callable[[str], int]) -> tuple[str, int]:
    """`fields` as JSON and its `measure`; a body that cannot be written as UTF-8 JSON falls back to
    text, then to base64 (in `fields`). `measure` raises ValueError for text that cannot go out."""
    for fallback in (None, "text", "base64"):
        if fallback is not None and fields.get("body") is not None:
            response = report.response
            assert response is not None
            fields.update(_decode_body(response.body, "", response.truncated, force=fallback))
        try:
            text = json.dumps(fields, ensure_ascii=False, allow_nan=False)
            return text, measure(text)
        except (ValueError, RecursionError):
            continue
    raise AssertionError(f"item {report.id!r} cannot be written even in base64")  # pragma: no cover


def _utf8_size(text: str) -> int:
    """Bytes of `text` in a UTF-8 file; UnicodeEncodeError (a ValueError) for a lone surrogate."""
    return len(text.encode("utf-8"))


def _body_past_base64(fields: dict[str, Any], line_size: int, data: bytes) -> bool:
    """Whether the body of a line of `line_size` bytes written from `fields` takes more than `data` in
    base64 (quoted): escaped text, or JSON written back (`1e15` is `1000000000000000.0`). Its share is the
    line less the same line with a null body (four bytes), so the body itself is not written twice."""
    rest = json.dumps({**fields, "body": None}, ensure_ascii=False, allow_nan=False)
    return line_size - _utf8_size(rest) + len("null") > 4 * math.ceil(len(data) / 3) + 2


class Rendered(NamedTuple):
    body: bytes
    dropped: dict[str, int]  # bodies, headers, messages


_PARTS = (("body", "bodies_dropped"), ("headers", "headers_dropped"), ("message", "messages_dropped"))


def render(reports: Sequence[ItemReport], summary: dict[str, Any], max_bytes: int) -> Rendered:
    """The answer's JSON, dropping the largest parts first until it fits `max_bytes` as posted."""
    items = [_Item(report) for report in reports]
    frame = ENVELOPE_BYTES + posted_size('{"responses":[],"summary":}') + len(items)  # brackets, commas
    summary_room = posted_size(json.dumps({**summary, **{name: 10**6 for _, name in _PARTS}}))
    total = frame + summary_room + sum(item.size for item in items)
    dropped = {name: 0 for _, name in _PARTS}
    dropped["bodies_dropped"] = sum(report.body_dropped for report in reports)  # let go while the call ran
    dropped["headers_dropped"] = sum(report.headers_dropped for report in reports)
    for part, name in _PARTS:
        candidates = sorted((item for item in items if item.droppable(part)), key=lambda item: item.size)
        while total > max_bytes and candidates:
            item = candidates.pop()
            before = item.size
            item.drop(part)
            total += item.size - before
            dropped[name] += 1
    text = '{"responses":[' + ",".join(item.text for item in items) + '],"summary":'
    return Rendered(body=(text + json.dumps({**summary, **dropped}) + "}").encode("utf-8"), dropped=dropped)


def _fields(report: ItemReport) -> dict[str, Any]:
    out: dict[str, Any] = {"id": report.id}
    if report.response is not None:
        response = report.response
        out["status"] = response.status
        out["headers"] = {k: v for k, v in response.headers.items() if k not in DROPPED_RESPONSE_HEADERS}
        out.update(_decode_body(response.body, response.headers.get("content-type", ""), response.truncated))
        if report.body_dropped:
            out.update(body=None, body_dropped=True)
            out.pop("encoding", None)
        if report.headers_dropped:
            out.update(headers=None, headers_dropped=True)
    elif report.skipped is not None:
        out["skipped"] = report.skipped
    else:
        out["error"] = {"type": report.error, "message": _readable(report.message)}
    out["attempts"] = report.attempts
    out["elapsed_ms"] = round(report.elapsed_s * 1000, 1)
    return out


def _readable(message: str) -> str:
    """An error message as text that posts: bounded, lone surrogates (from undecodable bytes) spelled out."""
    cut = message if len(message) <= MAX_MESSAGE_CHARS else message[: MAX_MESSAGE_CHARS - 1] + "…"
    return cut.encode("utf-8", "backslashreplace").decode("utf-8")


def _decode_body(data: bytes, content_type: str, truncated: bool, *, force: str | None = None) -> dict[str, Any]:
    """JSON parsed, text as a string, anything else base64; a cut body is never parsed.

    `force` ("text" or "base64") skips the forms before it, for a body whose parsed
    form could not be written.
    """
    out: dict[str, Any] = {"truncated": True} if truncated else {}
    media = content_type.split(";")[0].strip().lower()
    if not data:
        out["body"] = None
        return out
    if force is None and not truncated and (media == "application/json" or media.endswith("+json")):
        try:
            out["body"] = loads_upstream(data)
            return out
        except ValueError:
            pass
    if force != "base64":
        try:
            out["body"] = data.decode("utf-8")
            out.pop("encoding", None)
            return out
        except UnicodeDecodeError:
            pass
    out["body"], out["encoding"] = base64.b64encode(data).decode(), "base64"
    return out
