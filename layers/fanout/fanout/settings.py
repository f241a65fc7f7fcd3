"""Per-function configuration, read once per container from `FANOUT_*` variables.

Each Lambda function sets its own values in template.yaml, so the same code runs
with a different ceiling per strategy. A bad value must fail the cold start with
the variable's name, not surface later as a 500 on some request.
"""

from __future__ import annotations

from pydantic import Field, HttpUrl, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fanout.transports import TransportName

ENV_PREFIX = "FANOUT_"

#: The bundled local upstream that `make run` starts (see fanout_local.upstream).
LOCAL_UPSTREAM_URL = "http://127.0.0.1:3001/delay"

#: API Gateway gives up on an integration after 29 s (REST) / 30 s (HTTP API):
#: the fan-out must have answered before that.
API_GATEWAY_LIMIT_S = 29.0


class ConfigError(RuntimeError):
    """The environment holds a value the service cannot start with."""


class Settings(BaseSettings):
    """What one function may do per call. A request may ask for less, never more."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    target_url: HttpUrl = Field(
        default=HttpUrl(LOCAL_UPSTREAM_URL),
        description="The upstream every request of a call goes to.",
    )
    max_concurrency: int = Field(default=10, ge=1, le=1000, description="Ceiling on requests in flight.")
    max_requests: int = Field(default=1000, ge=1, le=100_000, description="Largest n one call may ask for.")
    request_timeout_s: float = Field(default=5.0, gt=0, le=API_GATEWAY_LIMIT_S)
    deadline_s: float = Field(default=25.0, gt=0, lt=API_GATEWAY_LIMIT_S)
    transport: TransportName = Field(default="aiohttp", description="What carries the requests (benchmarks/).")

    @model_validator(mode="after")
    def _timeout_fits_deadline(self) -> Settings:
        if self.request_timeout_s > self.deadline_s:
            raise ValueError(
                f"{ENV_PREFIX}REQUEST_TIMEOUT_S ({self.request_timeout_s}) must not exceed "
                f"{ENV_PREFIX}DEADLINE_S ({self.deadline_s})"
            )
        return self


def load_settings() -> Settings:
    """Read the environment, turning pydantic's report into one naming the variables."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            name = f"{ENV_PREFIX}{field.upper()}" if field else "configuration"
            given = f" (got {error['input']!r})" if field else ""
            problems.append(f"{name}{given}: {error['msg']}")
        raise ConfigError("Invalid configuration: " + "; ".join(problems)) from exc
