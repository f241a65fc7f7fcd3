"""fanout: one API call, many outbound HTTP requests, bounded and on time.

Modules, arrows pointing one way:
- `engine`: the three strategies under a deadline (asyncio only);
- `transports`: the pooled HTTP clients that carry the engine's requests (pyreqwest, pinned by
  `pinning`, or aiohttp), each behind the guard of `egress`;
- `settings`: per-function limits from `FANOUT_*` environment variables;
- `observability`: logs, EMF metrics and spans of each call (Powertools, OpenTelemetry);
- `app`: the FastAPI routes over the engine;
- `lambda_loop`: the one event loop a Lambda container keeps for Mangum;
- `lambda_events`: what a function may be invoked with (API Gateway requests).

The names below are imported on first use, so `import fanout.engine` loads
neither FastAPI nor pydantic.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fanout.app import create_app
    from fanout.engine import FanoutResult, Outcome, Strategy, fan_out
    from fanout.lambda_events import UnsupportedEvent, api_gateway_requests_only
    from fanout.lambda_loop import install_event_loop
    from fanout.observability import Telemetry, observe_invocations
    from fanout.settings import ConfigError, Settings, load_settings

_HOMES = {
    "create_app": "fanout.app",
    "FanoutResult": "fanout.engine",
    "Outcome": "fanout.engine",
    "Strategy": "fanout.engine",
    "fan_out": "fanout.engine",
    "install_event_loop": "fanout.lambda_loop",
    "UnsupportedEvent": "fanout.lambda_events",
    "api_gateway_requests_only": "fanout.lambda_events",
    "Telemetry": "fanout.observability",
    "observe_invocations": "fanout.observability",
    "ConfigError": "fanout.settings",
    "Settings": "fanout.settings",
    "load_settings": "fanout.settings",
}

__all__ = [
    "ConfigError",
    "FanoutResult",
    "Outcome",
    "Settings",
    "Strategy",
    "Telemetry",
    "UnsupportedEvent",
    "api_gateway_requests_only",
    "create_app",
    "fan_out",
    "install_event_loop",
    "load_settings",
    "observe_invocations",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'fanout' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
