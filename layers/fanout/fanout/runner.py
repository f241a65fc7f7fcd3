"""What a container builds once from its settings to send requests: the pooled client, the targets'
limiters and POST /batch's runner over them (the API functions and the jobs worker alike)."""

from __future__ import annotations

from fanout.batch import BatchRunner
from fanout.politeness import Politeness
from fanout.settings import Settings
from fanout.transports import Transport, make_transport


def build_runner(settings: Settings, transport: Transport | None = None) -> BatchRunner:
    """The runner, its `transport` (made from the settings unless given) and its `politeness`."""
    transport = transport or make_transport(
        settings.transport,
        max_connections=settings.max_concurrency,
        timeout_s=settings.request_timeout_s,
        max_per_host=settings.max_per_host,
        allow_private=settings.allow_private_networks,
    )
    politeness = Politeness(
        ceiling=settings.max_concurrency,
        max_in_flight={name: t.max_in_flight for name, t in settings.upstreams.items() if t.max_in_flight},
        rate_per_s={name: t.rate_per_s for name, t in settings.upstreams.items() if t.rate_per_s},
        circuit_failures=settings.circuit_failures,
        circuit_cool_down_s=settings.circuit_cool_down_s,
    )
    return BatchRunner(
        transport,
        max_attempts=settings.max_attempts,
        max_item_bytes=settings.max_item_bytes,
        rate_per_s=settings.rate_per_s,
        politeness=politeness,
    )
