"""What a container builds once from its settings to send requests: the pooled client, the targets'
limiters and POST /batch's runner over them (the API functions and the jobs worker alike)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fanout.politeness import Politeness
from fanout.settings import Settings
from fanout.transports import Transport, make_transport

if TYPE_CHECKING:
    from fanout.batch import BatchRunner


def build_transport(settings: Settings) -> Transport:
    """The pooled client every request of this container goes through."""
    return make_transport(
        settings.transport,
        max_connections=settings.max_concurrency,
        timeout_s=settings.request_timeout_s,
        max_per_host=settings.max_per_host,
        allow_private=settings.allow_private_networks,
    )


def build_politeness(settings: Settings) -> Politeness:
    """The targets' limiters: each target's pace, pauses and circuit, shared by every call."""
    return Politeness(
        ceiling=settings.max_concurrency,
        max_in_flight={name: t.max_in_flight for name, t in settings.upstreams.items() if t.max_in_flight},
        rate_per_s={name: t.rate_per_s for name, t in settings.upstreams.items() if t.rate_per_s},
        circuit_failures=settings.circuit_failures,
        circuit_cool_down_s=settings.circuit_cool_down_s,
    )


def build_runner(
    settings: Settings, transport: Transport | None = None, politeness: Politeness | None = None
) -> BatchRunner:
    """/batch's runner over `transport` and `politeness` (made from the settings unless given).

    fanout.batch (with tenacity and aiolimiter) is imported here, so a function serving only the
    seed routes never loads it (some 10 ms of its cold start).
    """
    from fanout.batch import BatchRunner

    return BatchRunner(
        transport or build_transport(settings),
        max_attempts=settings.max_attempts,
        max_item_bytes=settings.max_item_bytes,
        rate_per_s=settings.rate_per_s,
        politeness=politeness or build_politeness(settings),
    )
