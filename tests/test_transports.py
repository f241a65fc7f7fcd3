"""What every transport promises, the same whichever is configured: one set of tests over each.

Through `send` (POST /batch and jobs) and `get_status` (the seed routes) against the bundled
upstream on 127.0.0.1: bodies decoded by us and capped, encodings not asked for left alone,
redirects followed by hand, header values that are not UTF-8, Retry-After, the User-Agent, and
the name of every way a request can fail.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pyreqwest.exceptions as pe
import pytest
from pyreqwest.http import Url
from pyreqwest.request import RequestBuilder

from conftest import run
from fanout.engine import RequestError
from fanout.targets import TargetScope
from fanout.transport_pyreqwest import CLOSED_EARLY, CONNECTING, _request_error
from fanout.transports import DISCARD_BYTES, TRANSPORTS, UpstreamResponse, make_transport
from fanout_local.upstream import LocalUpstream

CAP = 1000


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def send(transport: str, upstream: LocalUpstream) -> Callable[..., UpstreamResponse]:
    """`send(path, **options)` through one transport (a new one per call) to the bundled upstream."""

    def call(path: str, *, method: str = "GET", max_redirects: int = 2, timeout_s: float = 2.0) -> UpstreamResponse:
        async def go() -> UpstreamResponse:
            client = make_transport(transport, max_connections=4, timeout_s=timeout_s, allow_private=True)
            scope = TargetScope(
                name="t",
                host="127.0.0.1",
                ports=frozenset({upstream.port}),
                redirect_hosts=frozenset(),
                schemes=frozenset({"http"}),
                max_redirects=max_redirects,
                private_networks=(),
            )
            try:
                return await client.send(
                    method, Url(upstream.url + path), headers={}, body=None, max_body_bytes=CAP, scope=scope
                )
            finally:
                await client.aclose()

        return run(go())

    return call


@pytest.fixture
def get_status(transport: str, upstream: LocalUpstream) -> Callable[[str], tuple[int, str | None]]:
    def call(path: str) -> tuple[int, str | None]:
        async def go() -> tuple[int, str | None]:
            client = make_transport(transport, max_connections=4, timeout_s=0.5, allow_private=True)
            try:
                return await client.get_status(upstream.url + path)
            finally:
                await client.aclose()

        return run(go())

    return call


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate"])
def test_a_body_is_decoded_by_us(send: Callable[..., UpstreamResponse], encoding: str) -> None:
    response = send(f"/encoded?as={encoding}")
    assert (response.status, response.body, response.truncated) == (200, b"hello, encoded", False)
    assert "content-encoding" not in response.headers and "content-length" not in response.headers


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_body_that_does_not_decode_is_a_decoding_error(send: Callable[..., UpstreamResponse], encoding: str) -> None:
    with pytest.raises(RequestError) as error:
        send(f"/encoded?as={encoding}&bad=1")
    assert error.value.kind == "DecodingError"
    assert error.value.detail.startswith(f"the {encoding} body does not decode: ")


@pytest.mark.parametrize("encoding", ["br", "zstd"])
def test_an_encoding_not_asked_for_is_passed_on_as_sent(send: Callable[..., UpstreamResponse], encoding: str) -> None:
    response = send(f"/encoded?as={encoding}")
    assert (response.body, response.headers["content-encoding"]) == (b"hello, encoded", encoding)


def test_a_gzip_bomb_gives_the_cap(send: Callable[..., UpstreamResponse]) -> None:
    response = send("/gzip-bomb?gb=1")
    assert (response.body, response.truncated) == (bytes(CAP), True)


def test_a_body_is_read_whole_up_to_the_cap_and_cut_there(send: Callable[..., UpstreamResponse]) -> None:
    whole = send(f"/bytes?n={CAP}&type=text/plain")
    assert (whole.body, whole.truncated) == (b"x" * CAP, False)
    cut = send(f"/bytes?n={CAP + 1}&type=text/plain")
    assert (cut.body, cut.truncated) == (b"x" * CAP, True)
    endless = send("/endless")
    assert (endless.body, endless.truncated) == (b"y" * CAP, True)


def test_a_redirect_is_followed_by_hand(send: Callable[..., UpstreamResponse], upstream: LocalUpstream) -> None:
    response = send("/redirect?to=/echo/there&status=307", method="POST")
    assert response.status == 200
    assert json.loads(response.body)["target"] == "/echo/there"
    assert json.loads(response.body)["method"] == "POST"  # 307 keeps the method
    assert upstream.stats.requests == 2


def test_a_redirect_is_answered_as_is_where_none_may_be_followed(send: Callable[..., UpstreamResponse]) -> None:
    response = send("/redirect?to=/echo&status=302", max_redirects=0)
    assert (response.status, response.headers["location"]) == (302, "/echo")


def test_a_redirect_status_without_location_is_the_answer_body_and_all(send: Callable[..., UpstreamResponse]) -> None:
    response = send("/status/302")
    assert (response.status, json.loads(response.body)) == (302, {"status": 302})


def test_a_location_on_an_answer_that_is_no_redirect_keeps_its_body(send: Callable[..., UpstreamResponse]) -> None:
    response = send("/redirect?to=/created/1&status=201")
    assert (response.status, response.headers["location"], json.loads(response.body)) == (201, "/created/1", {})


def test_every_request_says_it_comes_from_fanout(send: Callable[..., UpstreamResponse]) -> None:
    assert json.loads(send("/echo").body)["headers"]["user-agent"] == "fanout"


def test_a_header_value_that_is_not_utf8_is_replaced_not_fatal(send: Callable[..., UpstreamResponse]) -> None:
    response = send("/non-utf8")
    assert response.status == 200
    # aiohttp keeps "caf" and replaces the bad byte; pyreqwest gives no bytes of the value to keep
    assert response.headers["x-legacy"] in {"caf\ufffd", "\ufffd"}
    assert response.headers["content-type"] == "text/plain"  # the other headers are all there


def test_a_seed_request_keeps_its_connection_after_a_short_body_and_drops_it_after_a_long_one(
    transport: str, upstream: LocalUpstream
) -> None:
    """The body is not kept: up to DISCARD_BYTES of it is read so the connection can be reused,
    and a longer body is left unread (its connection closed) rather than read to its end."""

    async def go(path: str, times: int) -> int:
        client = make_transport(transport, max_connections=1, timeout_s=2, allow_private=True)
        opened = upstream.stats.connections
        try:
            for _ in range(times):
                assert await client.get_status(upstream.url + path) == (200, None)
        finally:
            await client.aclose()
        return upstream.stats.connections - opened

    assert run(go("/bytes?n=1000", 3)) == 1
    assert run(go(f"/bytes?n={DISCARD_BYTES // 2}", 3)) == 1
    assert run(go(f"/bytes?n={DISCARD_BYTES * 128}", 3)) == 3
    assert run(go("/endless", 2)) == 2


def test_pyreqwest_reads_as_much_of_a_body_before_answering_as_a_seed_request_may_discard() -> None:
    # what fanout.transport_pyreqwest relies on instead of reading a discarded body itself
    assert RequestBuilder.default_streamed_read_buffer_limit() == DISCARD_BYTES


def test_the_seed_routes_get_retry_after(get_status: Callable[[str], tuple[int, str | None]]) -> None:
    assert get_status("/retry-after?key=seed&fail=5&s=7") == (429, "7")
    assert get_status("/delay?ms=0") == (200, None)


@pytest.mark.parametrize(
    ("path", "kind"),
    [
        ("/reset", "RemoteProtocolError"),  # closed before any answer
        ("/cut", "ReadError"),  # the body broke off
        ("/stall-body", "ReadTimeout"),  # the body stopped coming
        ("/hang", "ReadTimeout"),  # connected, no answer
        ("/slow-headers?interval=0.05", "ReadTimeout"),  # the headers a byte at a time, past the timeout
        ("/many-headers?n=10000", "RemoteProtocolError"),  # a head no client takes
        ("/fat-headers?n=90&size=4000", "RemoteProtocolError"),  # one both take: 360 KB, over MAX_HEAD_BYTES
    ],
)
def test_every_failure_has_the_same_name_on_every_transport(
    send: Callable[..., UpstreamResponse], path: str, kind: str
) -> None:
    with pytest.raises(RequestError) as error:
        send(path, timeout_s=0.5)
    assert error.value.kind == kind


def test_a_head_within_max_head_bytes_comes_back_whole(send: Callable[..., UpstreamResponse]) -> None:
    response = send("/fat-headers?n=15&size=4000")  # 60 KB of 64 KiB
    assert response.status == 200
    assert [response.headers[f"x-h{index}"] for index in range(15)] == ["v" * 4000] * 15


@pytest.mark.parametrize(
    ("name", "detail"),
    [
        ("pyreqwest", "connection error: Connection refused (os error 111)"),  # reqwest's message, its last cause
        ("aiohttp", "Cannot connect to host 127.0.0.1:9 ssl:default [Connect call failed ('127.0.0.1', 9)]"),
    ],
)
def test_a_refused_connect_is_a_connect_error_that_says_why(name: str, detail: str) -> None:
    async def go() -> Any:
        client = make_transport(name, max_connections=1, timeout_s=1, allow_private=True)
        try:
            return await client.get_status("http://127.0.0.1:9/")  # the discard port: nothing listens
        finally:
            await client.aclose()

    with pytest.raises(RequestError) as error:
        run(go())
    assert (error.value.kind, error.value.detail) == ("ConnectError", detail)


CAUSES_AFTER_CONNECTING = [{"message": "error sending request"}, {"message": "client error (SendRequest)"}]


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (
            pe.ConnectTimeoutError("t", {"causes": [{"message": CONNECTING}, {"message": "timed out"}]}),
            "ConnectTimeout",
        ),
        (pe.ConnectTimeoutError("t", {"causes": CAUSES_AFTER_CONNECTING}), "ReadTimeout"),
        (pe.ReadTimeoutError("t", {"causes": []}), "ReadTimeout"),
        (pe.ConnectError("c", {"causes": [{"message": CONNECTING}, {"message": "refused"}]}), "ConnectError"),
        (
            pe.ConnectError("c", {"causes": [*CAUSES_AFTER_CONNECTING, {"message": CLOSED_EARLY}]}),
            "RemoteProtocolError",
        ),
        (pe.ConnectError("c", {"causes": [*CAUSES_AFTER_CONNECTING, {"message": "reset by peer"}]}), "ReadError"),
        (pe.BodyDecodeError("b", {"causes": [{"message": "end of file before message length reached"}]}), "ReadError"),
        (pe.ReadError("r", {"causes": []}), "ReadError"),
        (pe.WriteError("w", {"causes": []}), "WriteError"),
        (pe.DecodeError("d", {"causes": [{"message": "message head is too large"}]}), "RemoteProtocolError"),
        (ValueError("v"), "ValueError"),
    ],
)
def test_reqwest_errors_get_our_names(error: Exception, kind: str) -> None:
    """Each reqwest error class and chain of causes the pyreqwest transport tells apart (the live
    tests above cover the ones a test upstream can provoke)."""
    assert _request_error(error).kind == kind


def test_reqwest_messages_keep_their_innermost_cause() -> None:
    error = pe.ConnectError("connection error", {"causes": [{"message": CONNECTING}, {"message": "refused (111)"}]})
    assert _request_error(error).detail == "connection error: refused (111)"
    assert _request_error(pe.ReadError("read error", {"causes": []})).detail == "read error"
