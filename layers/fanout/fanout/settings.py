"""Per-function configuration, read once per container from `FANOUT_*` variables.

Each Lambda function sets its own values in template.yaml, so the same code runs
with a different ceiling per strategy. A bad value must fail the cold start with
the variable's name, not surface later as a 500 on some request.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field, HttpUrl, IPvAnyNetwork, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from fanout.politeness import CIRCUIT_COOL_DOWN_S, CIRCUIT_THRESHOLD
from fanout.transports import TransportName

ENV_PREFIX = "FANOUT_"

#: The bundled local upstream that `make run` starts (see fanout_local.upstream).
LOCAL_UPSTREAM_URL = "http://127.0.0.1:3001/delay"

#: API Gateway gives up on an integration after 29 s (REST) / 30 s (HTTP API):
#: the fan-out must have answered before that.
API_GATEWAY_LIMIT_S = 29.0

#: What one request can add to a seed route's answer as Lambda posts it, at most: its
#: status code, and its index and error in `errors` (keys escaped a second time).
SEED_ANSWER_BYTES_PER_REQUEST = 80


class ConfigError(RuntimeError):
    """The environment holds a value the service cannot start with."""


_HOST_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


class UpstreamTarget(BaseModel):
    """One name a /batch caller may send requests to, and what it allows.

    In FANOUT_UPSTREAMS either a URL string (https only, no redirects, no
    Authorization forwarded, public addresses only) or an object with these fields.
    """

    model_config = {"frozen": True, "extra": "forbid"}

    url: HttpUrl
    allow_http: bool = False
    max_redirects: int = Field(default=0, ge=0, le=10)
    redirect_hosts: tuple[str, ...] = Field(default=(), description="Hosts besides the target's a redirect may reach.")
    forward_authorization: bool = False
    private: bool = Field(default=False, description="The target's own host may resolve to private addresses.")
    max_in_flight: int | None = Field(default=None, ge=1, le=1000, description="Requests in flight at most.")
    rate_per_s: float | None = Field(default=None, gt=0, le=100_000, description="Requests started per second.")
    allow_cidrs: tuple[IPvAnyNetwork, ...] = Field(default=(), description="With private: only these networks.")

    @model_validator(mode="before")
    @classmethod
    def _from_url(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value

    @field_validator("redirect_hosts")
    @classmethod
    def _bare_host_names(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        for host in hosts:
            if not _HOST_NAME.match(host):
                raise ValueError(f"{host!r} is not a lower-case host name (no scheme, port, path or address)")
        return hosts

    @model_validator(mode="after")
    def _scheme_allowed(self) -> UpstreamTarget:
        if self.url.scheme == "http" and not self.allow_http:
            raise ValueError(f"{self.url} is plain http: set allow_http to true for this target, or use https")
        if self.allow_cidrs and not self.private:
            raise ValueError("allow_cidrs narrows a private target: set private to true as well, or drop allow_cidrs")
        return self


class Settings(BaseSettings):
    """What one function may do per call. A request may ask for less, never more."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    target_url: HttpUrl = Field(
        default=HttpUrl(LOCAL_UPSTREAM_URL),
        description="The upstream every request of a call goes to.",
    )
    routes: Literal["all", "sync", "async", "async_sem", "batch", "jobs"] = Field(
        default="all",
        description="What the function serves: GET /sync, /async or /async_sem, POST /batch, the /jobs routes, "
        "or all of them (the jobs with a jobs table); a function loads only what its routes need.",
    )
    max_concurrency: int = Field(default=10, ge=1, le=1000, description="Ceiling on requests in flight.")
    max_requests: int = Field(default=1000, ge=1, le=100_000, description="Largest n one call may ask for.")
    request_timeout_s: float = Field(default=5.0, gt=0, le=API_GATEWAY_LIMIT_S)
    deadline_s: float = Field(default=25.0, gt=0, lt=API_GATEWAY_LIMIT_S)
    transport: TransportName = Field(default="pyreqwest", description="What carries the requests (benchmarks/).")
    allow_private_networks: bool = Field(
        default=False, description="Let requests reach loopback/private addresses: local runs and tests only."
    )
    upstreams: dict[str, UpstreamTarget] = Field(default_factory=dict, description="/batch target names.")
    max_per_host: int = Field(default=0, ge=0, le=1000, description="Requests in flight to one host; 0: no cap.")
    rate_per_s: float = Field(default=0, ge=0, description="Requests started per second per container; 0: no cap.")
    max_attempts: int = Field(default=3, ge=1, le=10)
    circuit_failures: int = Field(
        default=CIRCUIT_THRESHOLD, ge=1, le=100_000, description="Failures in a row that open a target's circuit."
    )
    circuit_cool_down_s: float = Field(
        default=CIRCUIT_COOL_DOWN_S, gt=0, le=600, description="How long an open circuit refuses requests."
    )
    max_item_bytes: int = Field(default=256 * 1024, ge=1, le=6_000_000, description="Each /batch body is cut here.")
    max_response_bytes: int = Field(
        default=4_000_000, ge=65_536, le=6_000_000, description="The answer as Lambda posts it; its limit is 6 MB."
    )
    max_body_bytes: int = Field(
        default=1_000_000, ge=1024, le=6_000_000, description="Largest /batch request body, and line of a job's input."
    )
    # Jobs (fanout.jobs): where they live, set by the template for the jobs API and the worker.
    jobs_table: str = Field(default="", description="The DynamoDB table of jobs, chunks and target pauses.")
    input_bucket: str = Field(default="", description="Where job items are kept: uploads and inline items.")
    results_bucket: str = Field(default="", description="Where each chunk's results and each job's manifest go.")
    chunk_queue_url: str = Field(default="", description="The SQS queue of chunk messages the worker consumes.")
    dead_letter_queue_arn: str = Field(default="", description="Where chunks that kept failing go.")
    chunk_items: int = Field(default=500, ge=1, le=10_000, description="Items per chunk (one SQS message).")
    max_job_items: int = Field(default=10_000_000, ge=1, le=100_000_000, description="Largest job.")
    max_upload_bytes: int = Field(default=5 * 2**30, ge=1024, le=5 * 2**30, description="Largest uploaded file.")
    workers: int = Field(default=1, ge=1, le=1000, description="Worker containers at most (the ESM's maximum).")
    worker_batch_size: int = Field(default=1, ge=1, le=10, description="Chunks per worker invocation (the ESM's).")
    worker_timeout_s: float = Field(default=300, ge=1, le=900, description="The worker's Lambda timeout.")
    chunk_visibility_timeout_s: float = Field(default=0, ge=0, description="The chunk queue's; 0: not checked.")
    results_url_ttl_s: int = Field(default=3600, ge=60, le=7 * 86400, description="Presigned URLs last this long.")
    job_retention_days: int = Field(default=7, ge=1, le=365, description="Jobs and their files are kept this long.")

    @model_validator(mode="after")
    def _timeout_fits_deadline(self) -> Settings:
        if self.request_timeout_s > self.deadline_s:
            raise ValueError(
                f"{ENV_PREFIX}REQUEST_TIMEOUT_S ({self.request_timeout_s}) must not exceed "
                f"{ENV_PREFIX}DEADLINE_S ({self.deadline_s})"
            )
        return self

    @model_validator(mode="after")
    def _chunks_come_back_after_their_lease(self) -> Settings:
        """AWS's advice for an SQS event source, and what keeps a chunk from running twice at once: a
        message comes back only once the attempt that received it can no longer be running."""
        visibility, timeout = self.chunk_visibility_timeout_s, self.worker_timeout_s
        if visibility and visibility < 6 * timeout:
            raise ValueError(
                f"{ENV_PREFIX}CHUNK_VISIBILITY_TIMEOUT_S ({visibility:g}) must be at least 6 times "
                f"{ENV_PREFIX}WORKER_TIMEOUT_S ({timeout:g}): {6 * timeout:g}"
            )
        return self

    @model_validator(mode="after")
    def _seed_answer_fits(self) -> Settings:
        largest = self.max_requests * SEED_ANSWER_BYTES_PER_REQUEST
        if largest > self.max_response_bytes:
            raise ValueError(
                f"{ENV_PREFIX}MAX_REQUESTS ({self.max_requests}) allows answers of up to {largest} bytes, "
                f"over {ENV_PREFIX}MAX_RESPONSE_BYTES ({self.max_response_bytes}): lower one or raise the other"
            )
        return self


def load_settings() -> Settings:
    """Read the environment, turning pydantic's report into one naming the variables."""
    try:
        return Settings()
    except SettingsError as exc:  # a value that is not even JSON, for the object/list variables
        field = str(exc).split('"')[1] if '"' in str(exc) else "?"
        raise ConfigError(f"Invalid configuration: {ENV_PREFIX}{field.upper()}: not valid JSON ({exc})") from exc
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field, *inside = [str(part) for part in error["loc"]] or [""]
            name = f"{ENV_PREFIX}{field.upper()}"
            where = f" [{'.'.join(inside)}]" if inside else ""
            given = f" (got {error['input']!r})" if field and not inside else ""
            message = error["msg"].removeprefix("Value error, ")
            problems.append(f"{name}{where}{given}: {message}" if field else message)
        raise ConfigError("Invalid configuration: " + "; ".join(problems)) from exc
