"""Where a /batch item may go: under its target's base URL, and only where its redirects are allowed.

A caller names a target and a path, never a host. Three rules keep it there:

- `check_path`: a path that a server would read as leaving the base path is
  refused before anything is sent: dot segments, also percent-encoded (`%2e%2e`),
  double-encoded or hidden behind an encoded slash, and control characters.
- `target_url`: the path is appended to the base path as the caller wrote it; a
  percent-escape reaches the upstream as sent (`/a%20b` stays `/a%20b`).
- `TargetScope.check_redirect`: a redirect may go only to the target's own host
  at its own port (http's and https's when it uses its scheme's), or to a host
  the target lists in `redirect_hosts`, over an allowed scheme.

URLs are read and built with `pyreqwest.http.Url`: the WHATWG parser of Rust's `url`
crate, the one reqwest connects with and pydantic's `HttpUrl` (the targets' own
hosts) is built on. So a host is checked as the client will read it, in one spelling
on both sides (punycode, IPv6 in brackets), and /batch loads no URL library of its own.

Which addresses a hop may connect to is fanout.egress's decision; the scope says
which networks beyond global ones a private target's own host may use.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote, unquote

from pyreqwest.http import Url

from fanout.egress import PRIVATE_NETWORKS, IPNetwork

if TYPE_CHECKING:
    from fanout.settings import UpstreamTarget

REDIRECT_REFUSED = "RedirectRefused"
TOO_MANY_REDIRECTS = "TooManyRedirects"

_DEFAULT_PORTS = {"http": 80, "https": 443}
_MALFORMED_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: Characters a path may carry unescaped (RFC 3986 pchar and "/"), and "%" for the caller's own escapes.
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"  # pragma: no mutate (more safe letters: letters are safe already)
_DECODE_ROUNDS = 3  # decoded up to this often; a server that decodes more often is beyond help


def check_path(path: str) -> str:
    """`path` if it stays under a base path however a server decodes it; ValueError naming the problem."""
    if _MALFORMED_ESCAPE.search(path):
        raise ValueError("a '%' must start a percent-escape of two hex digits")
    decoded = path
    for _ in range(_DECODE_ROUNDS + 1):  # the path as sent, then each decoding of it
        if _CONTROL.search(decoded):
            raise ValueError("must not contain control characters, also percent-encoded")
        # "..;x" is ".." to servers that drop path parameters (Tomcat), "\\" a "/" to others
        if any(segment.split(";")[0] in (".", "..") for segment in re.split(r"[/\\]", decoded)):
            raise ValueError("must not contain '.' or '..' segments, also percent-encoded")
        decoded, before = unquote(decoded, encoding="latin-1"), decoded
        if decoded == before:
            break  # pragma: no mutate (decoding a decoded path again changes nothing)
    return path


def target_url(base: str, path: str, query: Mapping[str, Any]) -> Url:
    """`base` with `path` appended and `query` added: never another host or a parent of its path."""
    url = Url(base)
    # quoted but for the caller's own escapes, which go out as written
    joined = url.with_path(url.path.rstrip("/") + quote(path, safe=_PATH_SAFE))
    if not query:
        return joined
    return joined.extend_query([(key, _query_value(value)) for key, value in query.items()])


def _query_value(value: str | float | bool) -> str:
    """A query value as JSON spells it: true and false in lower case, numbers as written."""
    return str(value).lower() if isinstance(value, bool) else str(value)


class TargetScope(NamedTuple):
    """What one target's requests may reach: its host, redirect hosts, schemes, and private networks."""

    name: str
    host: str
    ports: frozenset[int]  # where a redirect may reach the target's own host: another port is another service
    redirect_hosts: frozenset[str]
    schemes: frozenset[str]
    max_redirects: int
    private_networks: tuple[IPNetwork, ...]  # beyond global addresses, for the target's own host only

    @classmethod
    def of(cls, name: str, target: UpstreamTarget) -> TargetScope:
        schemes = frozenset({"https", "http"} if target.allow_http else {"https"})
        port = target.url.port  # pydantic gives the scheme's own where the URL names none
        on_default = port == _DEFAULT_PORTS[target.url.scheme]  # then http -> https on 443 is the same service
        return cls(
            name=name,
            host=str(target.url.host).lower(),  # an http(s) URL always has a host
            ports=frozenset({_DEFAULT_PORTS[scheme] for scheme in schemes} if on_default else {port}),
            redirect_hosts=frozenset(target.redirect_hosts),
            schemes=schemes,
            max_redirects=target.max_redirects,
            private_networks=(tuple(target.allow_cidrs) or PRIVATE_NETWORKS) if target.private else (),
        )

    def networks_for(self, host: str | None) -> tuple[IPNetwork, ...]:
        """The private networks a connection to `host` may use: the target's own, for its own host only."""
        return self.private_networks if host is not None and host.lower() == self.host else ()

    def check_redirect(self, url: Url) -> str | None:
        """None if a redirect to `url` (absolute: joined to the URL it answers) may be followed, else why not."""
        if url.scheme not in self.schemes:
            return f"a redirect to {url.scheme}: URL is not allowed for this target"
        host = url.host_str  # an http(s) URL always has one, in lower case: the parser folds a name's case
        if host == self.host:  # first: listing the target's own host in redirect_hosts opens no port of it
            port = url.port_or_known_default
            if port in self.ports:
                return None
            ports = ", ".join(str(each) for each in sorted(self.ports))
            where = f"its ports ({ports})" if len(self.ports) > 1 else f"its port ({ports})"
            return f"a redirect to {host}:{port} is not allowed: the target's host is reached only at {where}"
        if host not in self.redirect_hosts:  # any port of a listed host: it reaches global addresses only
            return f"a redirect to {host} is not allowed: the target's redirect_hosts does not list it"
        return None
