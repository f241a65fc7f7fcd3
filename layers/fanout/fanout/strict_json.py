"""JSON as this service reads it and writes it: what JSON is, and what Python's json module also accepts.

Python's json reads `NaN`, `Infinity` and `1e400` (as inf), keeps a lone UTF-16
surrogate escape (`"\\ud800"`) as a string no UTF-8 encoder takes, and recurses
once per nesting level. Each of those, met while writing the answer, is a 500
that loses the batch. So:

- a caller's body: `parse_body` turns undecodable or unparseable bytes (nesting
  past the interpreter's stack included) into a `BodyError`; the models reject
  non-finite numbers and surrogates field by field (pydantic refuses a
  surrogate in a string; `encode_json` checks a JSON body), so the 4xx names
  the field;
- an upstream's body: `loads_upstream` refuses what is not JSON; what parses but
  cannot be written back as UTF-8 JSON (1e400, a surrogate, deep nesting) is found
  when the answer is written (fanout.batch_response), and sent as text instead.
"""

from __future__ import annotations

import json
from typing import Any


class BodyError(ValueError):
    """The request body is not a JSON text this service can read."""


def parse_body(data: bytes, what: str = "the body") -> Any:
    """The JSON value in a request body (or what `what` names: a job's line); NaN and Infinity come back
    as floats, for the models to name."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(f"{what} is not UTF-8 text (byte {exc.start} cannot start a character)") from exc
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise BodyError(f"{what} nests arrays or objects too deeply to read") from exc
    except ValueError as exc:  # JSONDecodeError, and integers past the interpreter's digit limit
        raise BodyError(f"{what} is not valid JSON: {exc}") from exc


def encode_json(value: Any) -> bytes:
    """`value` as a UTF-8 JSON text, or ValueError saying what JSON cannot carry."""
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"holds a lone UTF-16 surrogate ({exc.object[exc.start : exc.end]!r}), which is not text"
        ) from exc
    except RecursionError as exc:
        raise ValueError("nests arrays or objects too deeply") from exc
    except ValueError as exc:
        raise ValueError("holds NaN, Infinity or a number too large for a double, which JSON cannot carry") from exc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


#: Made once: `json.loads` with any option builds a decoder a call (some 2 us of an answer's item).
_UPSTREAM_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def loads_upstream(data: bytes) -> Any:
    """An upstream body parsed as JSON, or ValueError if it is not JSON (NaN and Infinity are not).

    Read as `json.loads` reads bytes: UTF-8, -16 or -32 as their first bytes tell."""
    try:
        return _UPSTREAM_DECODER.decode(data.decode(json.detect_encoding(data), "surrogatepass"))
    except RecursionError as exc:
        raise ValueError("nests too deeply") from exc
