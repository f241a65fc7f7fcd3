"""A /batch item stays under its target: the path join, its refusals, and where redirects may go."""

from __future__ import annotations

import json
import posixpath
import re
from typing import Any
from urllib.parse import unquote, urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyreqwest.http import Url

from conftest import post_batch
from fanout.egress import PRIVATE_NETWORKS
from fanout.settings import UpstreamTarget
from fanout.targets import TargetScope, check_path, target_url
from fanout_local.upstream import LocalUpstream, running_in_thread

ESCAPING = [
    "/..",
    "/../../_admin",
    "/a/../../b",
    "/.",
    "/a/./b",
    "/%2e%2e/_admin",
    "/%2E%2E/_admin",
    "/.%2e/_admin",
    "/%2e./x",
    "/%252e%252e/_admin",  # decoded twice by some servers
    "/%25252e%25252e/x",
    "/a/..%2f..%2f_admin",  # an encoded slash: "../.." once decoded
    "/a/%2e%2e%5c%2e%2e",  # an encoded backslash
    "/..;/_admin",  # Tomcat drops ";..." before normalising
    "/a/..;x=1/b",
]
MALFORMED = ["/a%", "/a%2", "/a%zz", "/%g0"]
CONTROL = ["/a%00b", "/a%0d%0aSet-Cookie:x", "/%7f", "/a%250a"]
ACCEPTED = ["/", "/items/7", "/items/a%20b", "/a%2Fb", "/%41", "/a..b", "/.well-known/x", "/a/...", "/~u/x;v=1", "/ü"]


def refusal_of(path: str) -> str:
    with pytest.raises(ValueError) as refused:
        check_path(path)
    return str(refused.value)


@pytest.mark.parametrize("path", ESCAPING)
def test_dot_segments_are_refused_however_encoded(path: str) -> None:
    assert refusal_of(path) == "must not contain '.' or '..' segments, also percent-encoded"


@pytest.mark.parametrize("path", MALFORMED)
def test_a_percent_must_start_an_escape(path: str) -> None:
    assert refusal_of(path) == "a '%' must start a percent-escape of two hex digits"


@pytest.mark.parametrize("path", CONTROL)
def test_control_characters_are_refused_also_encoded(path: str) -> None:
    assert refusal_of(path) == "must not contain control characters, also percent-encoded"


def test_decoding_stops_after_three_rounds() -> None:
    """Three decodings cover the servers we know; a fourth is not guessed at (the bound is stated)."""
    assert refusal_of("/%25252e%25252e/x") == "must not contain '.' or '..' segments, also percent-encoded"
    assert check_path("/%2525252e%2525252e/x") == "/%2525252e%2525252e/x"


@pytest.mark.parametrize("path", ACCEPTED)
def test_ordinary_paths_pass(path: str) -> None:
    assert check_path(path) == path


@pytest.mark.parametrize(
    ("base", "path", "query", "expected"),
    [
        ("https://h.example/api/v1", "/items/7", {}, "https://h.example/api/v1/items/7"),
        ("https://h.example/api/v1/", "/items/7", {}, "https://h.example/api/v1/items/7"),
        ("https://h.example/", "/", {}, "https://h.example/"),
        ("https://h.example", "/x", {}, "https://h.example/x"),
        ("https://h.example/api", "/items/a%20b", {}, "https://h.example/api/items/a%20b"),
        ("https://h.example/api", "/a%2Fb%41", {}, "https://h.example/api/a%2Fb%41"),  # escapes kept as sent
        ("https://h.example/api", "/ü x", {}, "https://h.example/api/%C3%BC%20x"),
        (
            "https://h.example:8443/api?key=k",
            "/x",
            {"a": 1, "b": True},
            "https://h.example:8443/api/x?key=k&a=1&b=true",
        ),
        ("https://h.example/api", "/x", {"q": "a b&c"}, "https://h.example/api/x?q=a+b%26c"),
        ("https://h.example/X", "/items", {}, "https://h.example/X/items"),
        ("https://h.example/a//", "/items", {}, "https://h.example/a/items"),
    ],
)
def test_target_url_appends_under_the_base(base: str, path: str, query: dict[str, Any], expected: str) -> None:
    assert str(target_url(base, path, query)) == expected


def server_view(raw_path: str) -> str:
    """What a lenient server makes of a path: decoded (often more than once), "\\" as "/", ";x" dropped,
    dot segments removed. The strictest reading a refused path could hope to exploit."""
    decoded = raw_path
    for _ in range(3):
        decoded = unquote(decoded, encoding="latin-1")
    segments = [segment.split(";")[0] for segment in re.split(r"[/\\]", decoded)]
    return posixpath.normpath("/".join(segments) or "/")


bases = st.sampled_from(
    ["https://h.example/api/v1", "https://h.example/", "http://h.example:8080/a/b/", "https://h.example/x?k=v"]
)
paths = st.lists(
    st.sampled_from([*"/.%25eEfFcC5;a\\", "%2e", "%2E", "%2f", "%5c", "%25", "..", "/..", "/."]), max_size=16
).map("".join)


@settings(max_examples=400, deadline=None)
@given(base=bases, tail=paths)
def test_a_joined_url_never_leaves_its_host_or_base_path(base: str, tail: str) -> None:
    path = "/" + tail
    try:
        check_path(path)
    except ValueError:
        return
    joined, origin = target_url(base, path, {}), Url(base)
    assert (joined.scheme, joined.host_str, joined.port) == (origin.scheme, origin.host_str, origin.port)
    prefix = origin.path.rstrip("/")
    assert joined.path.startswith(prefix + "/")
    assert (server_view(joined.path) + "/").startswith(server_view(prefix).rstrip("/") + "/")


@pytest.fixture
def make_handler(upstream: LocalUpstream, import_handler: Any) -> Any:
    def cold_start(**target: Any) -> Any:
        upstreams = {"up": {"url": f"{upstream.url}/base", "allow_http": True, **target}}
        return import_handler(FANOUT_UPSTREAMS=json.dumps(upstreams)).handler

    return cold_start


@pytest.mark.parametrize("path", ["/../../_admin", "/%2e%2e/echo", "/x/..%2F..%2Fecho"])
def test_an_escaping_path_is_a_422_naming_path(path: str, make_handler: Any, upstream: LocalUpstream) -> None:
    status, body = post_batch(make_handler(), {"requests": [{"id": "a", "target": "up", "path": path}]})
    assert status == 422
    assert body["message"].startswith("path: Value error, must not contain '.' or '..' segments")
    assert body["detail"][0]["loc"] == ["body", "requests", 0, "path"]
    assert upstream.stats.requests == 0


def test_escapes_reach_the_upstream_as_sent(make_handler: Any, upstream: LocalUpstream) -> None:
    """/echo under the base answers what it was asked for, so the path on the wire is visible."""
    handler = make_handler(url=upstream.url)
    requests = [
        {"id": "space", "target": "up", "path": "/echo/items/a%20b"},
        {"id": "slash", "target": "up", "path": "/echo/a%2Fb%41"},
        {"id": "utf8", "target": "up", "path": "/echo/ü", "query": {"q": "x y"}},
    ]
    _, body = post_batch(handler, {"requests": requests})
    assert [item["body"]["target"] for item in body["responses"]] == [
        "/echo/items/a%20b",
        "/echo/a%2Fb%41",
        "/echo/%C3%BC?q=x+y",
    ]


def redirect(to: str, **query: Any) -> dict[str, Any]:
    return {"id": to, "target": "up", "path": "/redirect", "query": {"to": to, **query}}


def test_redirects_stay_on_the_targets_host(make_handler: Any, upstream: LocalUpstream) -> None:
    handler = make_handler(url=upstream.url, max_redirects=2)
    elsewhere = f"http://localhost:{upstream.port}/delay?ms=1"  # the same listener, another host name
    _, body = post_batch(handler, {"requests": [redirect("/delay?ms=1"), redirect(elsewhere)]})
    first, second = body["responses"]
    assert (first["status"], first["body"]) == (200, {"delay_ms": 1.0})
    assert second["error"] == {
        "type": "RedirectRefused",
        "message": "a redirect to localhost is not allowed: the target's redirect_hosts does not list it",
    }
    assert upstream.stats.requests == 3  # two first hops and one allowed second hop


def test_a_redirect_to_another_port_of_the_targets_host_is_refused_and_sends_it_nothing(
    make_handler: Any, upstream: LocalUpstream
) -> None:
    """Another port of the target's host is another service (for a private target, one inside the VPC)."""
    handler = make_handler(url=upstream.url, max_redirects=2, private=True)
    with running_in_thread(delay_ms=1) as other:
        _, body = post_batch(handler, {"requests": [redirect(f"http://127.0.0.1:{other.port}/delay?ms=1")]})
        assert body["responses"][0]["error"] == {
            "type": "RedirectRefused",
            "message": f"a redirect to 127.0.0.1:{other.port} is not allowed: the target's host is reached only "
            f"at its port ({upstream.port})",
        }
        assert other.stats.requests == 0


def test_a_listed_redirect_host_is_followed(make_handler: Any, upstream: LocalUpstream) -> None:
    handler = make_handler(url=upstream.url, max_redirects=1, redirect_hosts=["localhost"])
    _, body = post_batch(handler, {"requests": [redirect(f"http://localhost:{upstream.port}/delay?ms=1")]})
    assert (body["responses"][0]["status"], body["responses"][0]["body"]) == (200, {"delay_ms": 1.0})


def chain_of(redirects: int, end: str = "/delay?ms=1") -> dict[str, Any]:
    """A request whose answer redirects `redirects` times before reaching `end`."""
    to = end
    for _ in range(redirects - 1):
        to = "/redirect?" + urlencode({"to": to})
    return {"id": "chain", "target": "up", "path": "/redirect", "query": {"to": to}}


@pytest.mark.parametrize("max_redirects", [1, 2, 3])
def test_a_chain_past_max_redirects_is_too_many_redirects(
    max_redirects: int, make_handler: Any, upstream: LocalUpstream
) -> None:
    handler = make_handler(url=upstream.url, max_redirects=max_redirects)
    _, body = post_batch(handler, {"requests": [chain_of(max_redirects + 1)]})
    (item,) = body["responses"]
    assert item["error"] == {"type": "TooManyRedirects", "message": f"more than {max_redirects} redirects"}
    assert item["attempts"] == 1  # not retried
    assert upstream.stats.requests == max_redirects + 1


@pytest.mark.parametrize("max_redirects", [1, 3])
def test_a_chain_within_max_redirects_is_followed_to_its_end(
    max_redirects: int, make_handler: Any, upstream: LocalUpstream
) -> None:
    handler = make_handler(url=upstream.url, max_redirects=max_redirects)
    _, body = post_batch(handler, {"requests": [chain_of(max_redirects)]})
    assert (body["responses"][0]["status"], body["responses"][0]["body"]) == (200, {"delay_ms": 1.0})
    assert upstream.stats.requests == max_redirects + 1


@pytest.mark.parametrize(
    ("elsewhere", "forwarded"),
    [("same", "Bearer t"), ("another host", None), ("another host and port", None)],
)
def test_authorization_goes_only_to_the_origin_it_was_given_for(
    elsewhere: str, forwarded: str | None, make_handler: Any, upstream: LocalUpstream
) -> None:
    """A redirect to another origin (host or port here, a listed host: the target's own is reached only at its
    port; the scheme is part of it too) drops Authorization; within its origin it stays."""
    with running_in_thread(delay_ms=1) as other:
        to = {
            "same": f"{upstream.url}/echo",
            "another host": f"http://localhost:{upstream.port}/echo",
            "another host and port": f"http://localhost:{other.port}/echo",
        }[elsewhere]
        handler = make_handler(url=upstream.url, max_redirects=1, forward_authorization=True,
                               redirect_hosts=["localhost"])  # fmt: skip
        request = {**redirect(to), "headers": {"Authorization": "Bearer t"}}
        _, body = post_batch(handler, {"requests": [request]})
    (item,) = body["responses"]
    assert item["body"]["headers"].get("authorization") == forwarded


@pytest.mark.parametrize("location", ["http://exa mple.com/", "http://[::1/", "http://a.example:99999/"])
def test_a_location_the_client_cannot_parse_is_refused_as_such(
    location: str, make_handler: Any, upstream: LocalUpstream
) -> None:
    """Not a URL to the client's parser, and no address in it: RedirectRefused, nothing sent after it."""
    handler = make_handler(url=upstream.url, max_redirects=2)
    _, body = post_batch(handler, {"requests": [redirect(location)]})
    (item,) = body["responses"]
    assert item["error"] == {"type": "RedirectRefused", "message": "the Location header is not a URL"}
    assert upstream.stats.requests == 1


def test_a_redirect_loop_ends_as_too_many_redirects(make_handler: Any, upstream: LocalUpstream) -> None:
    handler = make_handler(url=upstream.url, max_redirects=4)
    _, body = post_batch(handler, {"requests": [{"id": "loop", "target": "up", "path": "/loop"}]})
    assert body["responses"][0]["error"]["type"] == "TooManyRedirects"
    assert upstream.stats.requests == 5


def test_without_max_redirects_a_redirect_is_the_answer(make_handler: Any, upstream: LocalUpstream) -> None:
    _, body = post_batch(make_handler(url=upstream.url), {"requests": [redirect("/delay")]})
    assert (body["responses"][0]["status"], body["responses"][0]["headers"]["location"]) == (302, "/delay")
    assert body["summary"]["succeeded"] == 1  # a 3xx answer is an answer
    assert upstream.stats.requests == 1


@pytest.mark.parametrize(
    ("location", "allowed"),
    [
        ("https://api.example.com/x", True),
        ("https://API.example.com/x", True),
        ("HTTPS://api.example.com./x", False),  # a trailing dot is another name to the parser
        ("https://cdn.example.com/x", True),
        ("//cdn.example.com/x", True),  # scheme-relative: https, the scheme of the URL it answers
        ("/relative", True),  # the target's own host
        ("http://api.example.com/x", False),  # plain http: the target does not allow it
        ("https://evil.example.com/x", False),
        ("https://api.example.com.evil.example/x", False),
        ("https://api.example.com@evil.example/x", False),  # credentials, then the host
        ("https://evil.example\\@api.example.com/x", False),  # "\\" ends the host, as reqwest reads it
        ("https://example.com/x", False),
        ("ftp://api.example.com/x", False),
    ],
)
def test_scope_check_redirect(location: str, allowed: bool) -> None:
    target = UpstreamTarget(url="https://api.example.com/v1", max_redirects=2, redirect_hosts=("cdn.example.com",))
    scope = TargetScope.of("api", target)
    assert (scope.check_redirect(Url("https://api.example.com/v1/a").join(location)) is None) is allowed


@pytest.mark.parametrize(
    ("location", "why"),
    [
        ("https://api.example.com/x", None),
        ("http://api.example.com/x", None),  # allow_http: both schemes
        ("/relative", None),
        ("ftp://api.example.com/x", "a redirect to ftp: URL is not allowed for this target"),
        ("javascript:alert(1)", "a redirect to javascript: URL is not allowed for this target"),
        (
            "https://other.example/x",
            "a redirect to other.example is not allowed: the target's redirect_hosts does not list it",
        ),
        (
            "http:///other.example/x",  # http's slashes are not counted: the host is other.example
            "a redirect to other.example is not allowed: the target's redirect_hosts does not list it",
        ),
        (
            "http://Bücher.example/",  # the name as the client sends it: punycode
            "a redirect to xn--bcher-kva.example is not allowed: the target's redirect_hosts does not list it",
        ),
    ],
)
def test_why_a_redirect_is_refused(location: str, why: str | None) -> None:
    scope = TargetScope.of("api", UpstreamTarget(url="http://api.example.com", allow_http=True, max_redirects=1))
    assert scope.check_redirect(Url("http://api.example.com/a").join(location)) == why


@pytest.mark.parametrize(
    ("target", "location", "why"),
    [
        ("http://api.example.com", "https://api.example.com/x", None),  # upgraded to https's own port
        ("http://api.example.com", "https://api.example.com:443/x", None),
        ("https://api.example.com", "http://api.example.com/x", None),  # allow_http: both default ports
        ("http://api.example.com", "http://api.example.com:8080/x", "at its ports (80, 443)"),
        ("https://api.example.com:8443", "https://api.example.com:8443/x", None),
        ("https://api.example.com:8443", "http://api.example.com:8443/x", None),  # its port, either scheme
        ("https://api.example.com:8443", "https://api.example.com/x", "at its port (8443)"),
        ("http://10.0.0.5:8080", "http://10.0.0.5:6379/", "at its port (8080)"),
        ("http://10.0.0.5:8080", "http://10.0.0.5/", "at its port (8080)"),
        ("http://[fd00::5]:8080", "http://[fd00::5]:22/", "at its port (8080)"),
        ("http://api.example.com", "http://cdn.example.com:8080/x", None),  # a listed host: global addresses only
        ("http://cdn.example.com", "http://cdn.example.com:8080/x", "at its ports (80, 443)"),  # listed, yet its own
    ],
)
def test_the_targets_own_host_is_reached_only_at_its_ports(target: str, location: str, why: str | None) -> None:
    upstream = UpstreamTarget(url=target, allow_http=True, max_redirects=1, redirect_hosts=("cdn.example.com",))
    refused = TargetScope.of("api", upstream).check_redirect(Url(target).join(location))
    assert (refused is None, refused and refused.split("reached only ")[-1]) == (why is None, why)


def test_an_ipv6_or_unicode_target_is_its_own_redirect_host_in_the_clients_spelling() -> None:
    """The scope's host (pydantic's reading of the target) and a redirect's (the client's) agree."""
    for base, location in [("http://[::1]:8080/a", "http://[0::1]:8080/b"), ("https://Bücher.example/", "/b")]:
        target = UpstreamTarget(url=base, allow_http=True, max_redirects=1, private=True)
        scope = TargetScope.of("t", target)
        joined = Url(base).join(location)
        assert (scope.check_redirect(joined), scope.networks_for(joined.host_str)) == (None, PRIVATE_NETWORKS)


def test_a_scope_is_a_value() -> None:
    scope = TargetScope.of("a", UpstreamTarget(url="https://a.example"))
    with pytest.raises(AttributeError):
        scope.host = "b.example"  # type: ignore[misc]
    assert scope == TargetScope.of("a", UpstreamTarget(url="https://a.example")) and not hasattr(scope, "__dict__")


def test_scope_of_a_target() -> None:
    public = TargetScope.of("a", UpstreamTarget(url="https://A.example/x"))
    assert (public.host, public.schemes, public.max_redirects, public.private_networks) == (
        "a.example",
        frozenset({"https"}),
        0,
        (),
    )
    private = TargetScope.of("b", UpstreamTarget(url="http://db.internal", allow_http=True, private=True))
    assert private.private_networks == PRIVATE_NETWORKS
    assert (
        private.networks_for("DB.internal"),
        private.networks_for("other.internal"),
        private.networks_for(None),
    ) == (
        PRIVATE_NETWORKS,
        (),
        (),
    )
    narrowed = TargetScope.of(
        "c", UpstreamTarget(url="https://db.internal", private=True, allow_cidrs=("10.1.0.0/16",))
    )
    assert [str(network) for network in narrowed.private_networks] == ["10.1.0.0/16"]
