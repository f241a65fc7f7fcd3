"""Politeness: how much each target is sent, learned from how it answers.

A fixed concurrency cannot know what a target can take. Every request therefore passes
its target's `TargetLimiter` (one per target per container, kept across warm calls), as
`async with limiter.attempt(deadline)`: entering waits until the target may be sent one
more request (`admit`), leaving tells it how the request went (`finish`, or `abandon`
without an answer); the seed routes make the same calls by hand. Four
mechanisms, each after a published design:

1. Requests in flight (`limit`): slow start (one more per success, so it doubles each
   round trip, as TCP's, RFC 5681) up to the configured ceiling; then Vegas (Brakmo &
   Peterson 1994, as Netflix concurrency-limits' VegasLimit and Envoy's adaptive
   concurrency filter use it): a round's latency well above the target's baseline is a
   queue there, and the limit steps down to `limit * baseline / latency` plus a few (as
   Gradient2 does), at most halving; under the baseline it grows by its square root. So
   it settles near the knee where latency starts to grow. A throttle (429, 503)
   multiplies it by `THROTTLE_LIMIT_FACTOR`; a bare 503 does that and no more.
2. Start rate (`rate`): none until the target first throttles (a 429, or a 503 with
   Retry-After; a healthy target is never slowed); then the AWS SDKs' adaptive retry
   mode: a client-side token bucket whose rate backs off on throttling and grows back
   along a CUBIC curve (RFC 8312). The
   rate after a throttle comes from what the target served: the most successes over any
   window of the episode, less those a full bucket gives for free (counted in the first
   episode), per second: a lower bound of the target's rate, tight for a token bucket
   when the window is long against what the first episode counted as its bucket (at
   500/s that count holds the tokens refilled during those 20 ms, and the search's last
   0.1-0.2 s reads 8 to 34 % low: README, "Politeness"). Until the second throttle it
   grows by `DISCOVERY_GROWTH` each `DISCOVERY_STEP_S` to find that rate; a throttle too
   early in a paced episode to measure by cuts the rate by at most
   `EARLY_THROTTLE_FACTOR` (`_rate_found`). Starts are paced by GCRA (virtual scheduling).
3. Pause: `Retry-After` (seconds or a date) stops the whole target until then; requests
   wait at `admit` instead of drawing more 429s. A pause past the caller's deadline is
   `TargetPaused` at once.
4. Circuit breaker (Nygard, Release It!): `circuit_failures` failures in a row
   (connection errors, timeouts, 5xx; FANOUT_CIRCUIT_FAILURES) open it for
   `circuit_cool_down_s` (FANOUT_CIRCUIT_COOL_DOWN_S), during which
   requests fail at once as `CircuitOpen`; then one probe is let through, and its
   outcome closes or reopens it.

State is plain numbers (and a short deque of counts) in `TargetState`, so that a shared store can hold it where many
workers send to one target (jobs). One container's limiter knows only its own traffic:
N containers each learn a rate, and a target sees up to N times it (README, "Politeness").

Why our own: purgatory (asyncio) lets every request through a half-open breaker and runs
a message bus per request; aiolimiter's rate cannot change once set; no library found
adapts an asyncio rate or concurrency to a target's answers.
"""

from __future__ import annotations

import asyncio
import enum
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from types import MappingProxyType
from typing import NamedTuple

from fanout.engine import RequestError

CIRCUIT_OPEN = "CircuitOpen"
TARGET_PAUSED = "TargetPaused"
#: Errors that mean the target did not answer (its circuit counts them); others were refused here.
UNANSWERED = frozenset({"ConnectError", "ConnectTimeout", "ReadTimeout", "ReadError", "RemoteProtocolError"})

INITIAL_LIMIT = 8
THROTTLE_LIMIT_FACTOR = 0.7
VEGAS_ALPHA = 3.0  # requests allowed to queue at the target when the limit steps down
QUEUEING_ROUNDS = 2  # rounds in a row that must show a queue before the limit steps down
LATENCY_QUEUEING = 1.5  # latency this many times its baseline: the target is queueing
LATENCY_CLEAR = 1.2  # under this many times: room for one more
#: Latency growth below this is not taken for a queue at the target: a busy client's own event loop adds
#: as much (a 0 ms target at 100 in flight answers in about 10 ms on 2 cores).
LATENCY_FLOOR_S = 0.025
BASELINE_RESET_ROUNDS = 100  # the baseline (minimum latency) is forgotten now and then, as targets change

DISCOVERY_START_FACTOR = 2.0  # the first paced rate: twice what a full bucket gave per second,
DISCOVERY_START_MIN = 10.0  # and never less: a target that refused the very first requests says nothing of its rate
DISCOVERY_GROWTH = 1.5
DISCOVERY_STEP_S = 0.1
BLIND_RATE_FACTOR = 0.7  # a throttle when nothing was served since the last: the AWS SDKs' beta
EARLY_THROTTLE_S = 0.05  # a throttle this soon after a paced episode began measures too little (_rate_found)
EARLY_THROTTLE_FACTOR = 0.9  # ... and cuts the rate it was paced at by at most this
CUBIC_BETA = 0.98  # after a throttle, start at this share of the rate the target was found to serve
CUBIC_K_S = 10.0  # seconds to grow back to that rate; past it, growth accelerates again
ESTIMATE_MIN_SPAN_S = 0.02  # shorter windows are too few successes to measure a rate by
ESTIMATE_WINDOW_S = 2.0  # successes older than this are forgotten (the estimate looks no further back)
SUCCESS_BUCKET_S = 0.01  # successes are counted per bucket this long (a time per success costs memory and CPU)
PACING_TOLERANCE_S = 0.01  # GCRA: how late a start may be and still keep its slot
MIN_RATE = 0.5

CIRCUIT_THRESHOLD = 10
CIRCUIT_COOL_DOWN_S = 5.0

RETRY_AFTER_MAX_S = 3600.0


class Answer(enum.Enum):
    """What an attempt tells the limiter."""

    SERVED = "served"  # an answer that is not a throttle or a server failure (4xx included)
    THROTTLED = "throttled"  # 429, or 503 with Retry-After: a rate limit, slow down
    OVERLOADED = "overloaded"  # 503 without Retry-After: fewer in flight, and it counts as a failure
    FAILED = "failed"  # a connection error, a timeout, another 5xx: the target may be down


def classify(status: int | None, retry_after_s: float | None = None) -> Answer:
    """A status (None: no answer, a connection error or a timeout) as the limiter reads it. A bare 503
    says the server is struggling, not that it keeps a rate: it is not paced for it (one request to a
    failing path would otherwise slow the whole target to a crawl), but sent fewer at once."""
    if status is None:
        return Answer.FAILED
    if status == 429 or (status == 503 and retry_after_s is not None):
        return Answer.THROTTLED
    if status == 503:
        return Answer.OVERLOADED
    return Answer.FAILED if status >= 500 else Answer.SERVED


class Circuit(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True, repr=False, eq=False)  # nothing compares or prints it: 0.35 ms less at import
class TargetState:
    """What a target's limiter knows: numbers only, times on time.monotonic()'s clock."""

    limit: float
    rate: float | None = None  # starts per second; None: not paced
    paused_until: float = 0.0
    next_start: float = 0.0  # GCRA's theoretical arrival time
    in_flight: int = 0
    # the rate: episodes between throttles
    free: int | None = None  # successes a full bucket gives at once (from the first episode)
    episode_start: float = 0.0
    bucket_start: float = 0.0  # successes since then (the open bucket), and in the buckets before it
    bucket_count: int = 0
    success_buckets: deque[tuple[float, int]] = field(default_factory=deque)
    discovering: bool = False
    next_step: float = 0.0
    peak_rate: float = 0.0  # CUBIC's W_max: the rate the target was found to serve
    peak_at: float = 0.0
    # the limit: Vegas rounds
    slow_start: bool = True
    baseline_s: float = math.inf
    round_sum_s: float = 0.0
    round_count: int = 0
    round_min_s: float = math.inf
    rounds: int = 0
    queueing_rounds: int = 0  # rounds in a row whose latency said the target was queueing
    # the circuit
    circuit: Circuit = Circuit.CLOSED
    failures_in_a_row: int = 0
    circuit_until: float = 0.0
    probing: bool = False
    # what a call's summary reports (counted since the container started)
    throttled_answers: int = 0  # every 429 or 503
    throttles: int = 0  # episodes: throttles that slowed the target down (not the answers already in flight)
    pauses: int = 0
    circuit_opened: int = 0


class Attempt:
    """One request through a target's limiter, as `async with limiter.attempt(deadline) as sent:`.

    Inside, `sending()` marks when it went out and `answered()` what came back. On the way
    out the limiter records it: an answer, or a RequestError for an unanswered request
    (UNANSWERED) counts for the target; a request refused here (an address, a redirect)
    or never sent tells it nothing. A class, not a generator: this runs once per request.
    """

    __slots__ = ("_deadline", "_limiter", "_probe", "answered_at", "retry_after_s", "sent_at", "status")

    def __init__(self, limiter: TargetLimiter, deadline: float) -> None:
        self._limiter = limiter
        self._deadline = deadline
        self._probe = False
        self.sent_at: float | None = None  # time.monotonic()
        self.answered_at = 0.0
        self.status: int | None = None
        self.retry_after_s: float | None = None

    def sending(self) -> None:
        self.sent_at = time.monotonic()

    def answered(self, status: int, retry_after_s: float | None) -> None:
        self.status, self.retry_after_s = status, retry_after_s
        self.answered_at = time.monotonic()

    async def __aenter__(self) -> Attempt:
        limiter = self._limiter
        if not limiter.enter_at_once():
            self._probe = await limiter.admit(self._deadline)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        status = self.status
        if exc is None and status is not None:
            sent_at, answered_at = self.sent_at, self.answered_at
            latency_s = None if sent_at is None else answered_at - sent_at
            self._limiter.finish(self._probe, status, self.retry_after_s, latency_s, answered_at)
        else:
            self._limiter.abandon(self._probe, exc)


class TargetLimiter:
    """One target's politeness: `admit` before a request, `record` after it."""

    def __init__(
        self,
        name: str,
        *,
        ceiling: int,
        rate_ceiling: float | None = None,
        circuit_failures: int = CIRCUIT_THRESHOLD,
        circuit_cool_down_s: float = CIRCUIT_COOL_DOWN_S,
    ) -> None:
        self.name = name
        self.ceiling = max(1, ceiling)
        self.rate_ceiling = rate_ceiling
        self.circuit_failures = circuit_failures
        self.circuit_cool_down_s = circuit_cool_down_s
        self.state = TargetState(limit=min(INITIAL_LIMIT, self.ceiling), rate=rate_ceiling)
        self._waiters: deque[asyncio.Future[None]] = deque()  # requests waiting for a slot, first come first
        self._woken = 0  # waiters given a slot that have not taken it yet
        self._pacing = asyncio.Lock()  # one request at a time waits for its paced start

    def __repr__(self) -> str:
        return f"TargetLimiter({self.name!r}, ceiling={self.ceiling}, rate_ceiling={self.rate_ceiling})"

    def set_ceilings(self, ceiling: int, rate_ceiling: float | None) -> None:
        """New ceilings (a job's, while its chunks run): what was learned of the target stays, within them."""
        self.ceiling, self.rate_ceiling = max(1, ceiling), rate_ceiling
        state = self.state
        state.limit = min(state.limit, self.ceiling)
        if state.free is None:  # never throttled: only a ceiling paces it
            state.rate = rate_ceiling
        elif rate_ceiling is not None:
            state.rate = min(state.rate or rate_ceiling, rate_ceiling)
        self._wake()

    def attempt(self, deadline: float) -> Attempt:
        """One request: admitted on entry (`deadline`: a time.monotonic() time), recorded on exit."""
        return Attempt(self, deadline)

    def enter_at_once(self) -> bool:
        """Admit a request to a target that has never throttled (so it is neither paced nor paused),
        whose circuit is closed and which has room: the path of almost every request, kept short."""
        state = self.state
        room = state.in_flight < state.limit - self._woken and not self._waiters
        if room and state.rate is None and state.circuit is Circuit.CLOSED:
            state.in_flight += 1
            return True
        return False

    async def admit(self, deadline: float) -> bool:
        """Wait until the target may be sent one more request (`deadline`: a time.monotonic() time).

        True if this request is the half-open circuit's probe (give it back to `record`)."""
        if self.enter_at_once():
            return False
        state = self.state
        loop = asyncio.get_running_loop()
        while True:
            now = time.monotonic()
            try:
                probe = self._check_circuit(now)
            except RequestError:
                self._wake()  # a slot this request was given goes to the next, which will be refused as fast
                raise
            if state.paused_until > now:
                self._wake()
                if state.paused_until >= deadline:
                    wait = state.paused_until - now
                    raise RequestError(
                        TARGET_PAUSED, f"the target asked for {wait:.1f} s without requests, past this call's deadline"
                    )
                await asyncio.sleep(state.paused_until - now)
                continue
            if state.in_flight + self._woken >= int(state.limit) and not probe:
                await self._wait_for_a_slot(loop)
                continue
            state.in_flight += 1
            if probe:
                state.probing = True
            if state.rate is not None:
                try:
                    await self._pace()
                except BaseException:
                    self._release(probe)
                    raise
                if state.paused_until > time.monotonic() or state.circuit is Circuit.OPEN:
                    self._release(probe)  # a throttle or the circuit came while this one waited its turn
                    continue
            return probe

    async def _wait_for_a_slot(self, loop: asyncio.AbstractEventLoop) -> None:
        waiter = loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # given a slot, then cancelled: hand it on
                self._woken -= 1
                self._wake()
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            raise
        self._woken -= 1

    def _check_circuit(self, now: float) -> bool:
        """Raise CircuitOpen while open; True if this request is the half-open probe."""
        state = self.state
        if state.circuit is Circuit.CLOSED:
            return False
        if now < state.circuit_until or state.probing:
            left = max(0.0, state.circuit_until - now)
            raise RequestError(
                CIRCUIT_OPEN,
                f"the target failed {self.circuit_failures} times in a row; "
                + (f"not called for another {left:.1f} s" if left else "one request is probing it"),
            )
        state.circuit = Circuit.HALF_OPEN
        return True

    async def _pace(self) -> None:
        """GCRA, virtual scheduling, one request at a time (first come first): each waits for its start,
        and only then spaces the next by the rate of that moment, so a new rate applies at once."""
        state = self.state
        async with self._pacing:
            now = time.monotonic()
            start = max(state.next_start, now - PACING_TOLERANCE_S)
            if start > now:
                await asyncio.sleep(start - now)
            state.next_start = start + 1 / (state.rate or math.inf)

    def record(
        self,
        probe: bool,
        status: int | None,
        *,
        latency_s: float | None,
        retry_after_s: float | None,
        now: float | None = None,
    ) -> None:
        """How an admitted request went: its status (None: no answer), Retry-After in seconds if it had
        one; `now` if the caller has just read time.monotonic()."""
        if now is None:
            now = time.monotonic()
        answer = classify(status, retry_after_s)
        if answer is Answer.SERVED and not probe:
            self.served(latency_s, now)
            return
        state = self.state
        state.in_flight -= 1
        if probe:
            state.probing = False
        if answer is Answer.SERVED:
            self._served(now, latency_s)
        elif answer is Answer.THROTTLED:
            state.throttled_answers += 1
            self._throttled(now, retry_after_s)
        elif answer is Answer.OVERLOADED:
            state.throttled_answers += 1
            state.slow_start = False
            state.limit = max(1.0, state.limit * THROTTLE_LIMIT_FACTOR)
        if answer in (Answer.FAILED, Answer.OVERLOADED):  # a server failing, or with no word of when to return
            self._failed(now, probe)
        else:
            state.failures_in_a_row = 0
            if probe:
                state.circuit = Circuit.CLOSED
        if self._waiters:
            self._wake()

    def finish(
        self, probe: bool, status: int, retry_after_s: float | None, latency_s: float | None, now: float
    ) -> None:
        """An admitted request answered (`now`: when, on time.monotonic()'s clock): what `Attempt` does on
        its way out, for a caller that admits by hand (`enter_at_once`, else `admit`) to save the attempt
        object and its `async with` on every request."""
        # classify's SERVED, spelled here to save a call on every request (a test holds the two together)
        if status < 500 and status != 429 and not probe:
            self.served(latency_s, now)
        else:
            self.record(probe, status, latency_s=latency_s, retry_after_s=retry_after_s, now=now)

    def abandon(self, probe: bool, exc: BaseException | None) -> None:
        """An admitted request that got no answer: a RequestError that says the target did not answer
        (UNANSWERED) counts for it; anything else (refused here, cancelled, never sent) gives the slot back."""
        if isinstance(exc, RequestError) and exc.kind in UNANSWERED:
            self.record(probe, None, latency_s=None, retry_after_s=None)
        else:
            self.release(probe)

    def served(self, latency_s: float | None, now: float) -> None:
        """`record` for an answer that is neither a throttle nor a failure, to a request that was not
        the half-open probe: the path of almost every request, kept short (a tenth of the seed
        routes' CPU at 0 ms went to the limiter)."""
        state = self.state
        state.in_flight -= 1
        state.failures_in_a_row = 0
        self._served(now, latency_s)
        if self._waiters:
            self._wake()

    def release(self, probe: bool) -> None:
        """Give back an admitted request that says nothing of the target (never sent, or refused here)."""
        self._release(probe)

    def _release(self, probe: bool) -> None:
        state = self.state
        state.in_flight -= 1
        if probe:
            state.probing = False
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        """Give free slots to the first waiters; they check the pause and the circuit themselves."""
        free = int(self.state.limit) - self.state.in_flight - self._woken
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._woken += 1
                free -= 1

    # --- the rate and the limit ---------------------------------------------------------------

    def _served(self, now: float, latency_s: float | None) -> None:
        """An answer: slow start grows, the latency joins its Vegas round, a paced rate grows. Runs for
        almost every request, so the round's bookkeeping is inline and its end a call of its own."""
        state = self.state
        if now >= state.bucket_start + SUCCESS_BUCKET_S:
            self._open_bucket(now)
        elif now >= state.bucket_start:
            state.bucket_count += 1
        # else: the answer to a request sent before the last throttle, not this episode's
        if state.slow_start and state.limit < self.ceiling:
            state.limit += 1  # the ceiling is a whole number
        if latency_s is not None:
            state.round_sum_s += latency_s
            state.round_count += 1
            if latency_s < state.round_min_s:
                state.round_min_s = latency_s
                if latency_s < state.baseline_s:
                    state.baseline_s = latency_s
            if state.round_count >= state.limit:
                self._end_round()
        if state.rate is not None:
            self._grow_rate(now)

    def _end_round(self) -> None:
        """Vegas with a tolerance, per round of `limit` answers. A round's mean latency over
        `LATENCY_QUEUEING` times the baseline is a queue at the target: slow start ends (halving, as
        TCP's ssthresh); after `QUEUEING_ROUNDS` such rounds in a row the limit steps down to what the
        target holds without a queue (limit x baseline / latency + `VEGAS_ALPHA`, as Gradient2 does),
        never below half. One slow round is not enough: a busy client's own event loop stalls every
        request at once now and then. Under `LATENCY_CLEAR` the limit grows by its square root."""
        state = self.state
        latency = state.round_sum_s / state.round_count
        round_min = state.round_min_s
        state.round_sum_s, state.round_count, state.round_min_s = 0.0, 0, math.inf
        state.rounds += 1
        if self._queueing(latency):
            state.queueing_rounds += 1
            if state.slow_start:
                state.slow_start = False
                state.limit = max(1.0, state.limit / 2)
            elif state.queueing_rounds >= QUEUEING_ROUNDS:
                stepped = state.limit * state.baseline_s / latency + VEGAS_ALPHA
                state.limit = max(1.0, state.limit / 2, stepped)
        elif latency < state.baseline_s * LATENCY_CLEAR + LATENCY_FLOOR_S:
            state.queueing_rounds = 0
            if not state.slow_start:
                state.limit = min(self.ceiling, state.limit + math.sqrt(state.limit))
        if state.rounds % BASELINE_RESET_ROUNDS == 0:
            state.baseline_s = round_min  # forget an old minimum: the target may have changed
        self._wake()

    def _queueing(self, latency_s: float) -> bool:
        baseline = self.state.baseline_s
        return latency_s > baseline * LATENCY_QUEUEING and latency_s - baseline > LATENCY_FLOOR_S

    def _grow_rate(self, now: float) -> None:
        state = self.state
        assert state.rate is not None
        if state.discovering:
            if now >= state.next_step:
                state.rate *= DISCOVERY_GROWTH
                state.next_step = now + DISCOVERY_STEP_S
        elif state.peak_rate:
            since = max(0.0, now - state.peak_at) / CUBIC_K_S  # CUBIC: W(t) = W_max (1 + (1-b)(t/K - 1)^3)
            state.rate = state.peak_rate * (1 + (1 - CUBIC_BETA) * (since - 1) ** 3)
        if self.rate_ceiling is not None:
            state.rate = min(state.rate, self.rate_ceiling)

    def _throttled(self, now: float, retry_after_s: float | None) -> None:
        state = self.state
        if now < state.episode_start:  # an answer to what was in flight when this episode ended
            return
        state.throttles += 1
        state.slow_start = False
        state.limit = max(1.0, state.limit * THROTTLE_LIMIT_FACTOR)
        successes = sum(count for _, count in self._buckets(now))
        if state.free is None:  # the first episode: a full bucket's worth, all at once
            state.free = successes
            state.rate = max(DISCOVERY_START_MIN, successes * DISCOVERY_START_FACTOR)
            state.discovering = True
        else:
            state.peak_rate = max(MIN_RATE, self._rate_found(now, successes))
            state.discovering = False
        resume = now + (retry_after_s or 0.0)
        if retry_after_s:
            state.pauses += 1
            state.paused_until = max(state.paused_until, resume)
        state.episode_start = resume
        state.success_buckets.clear()
        state.bucket_start, state.bucket_count = resume, 0
        state.next_start = resume
        state.next_step = resume + DISCOVERY_STEP_S
        state.peak_at = resume
        if state.peak_rate and not state.discovering:
            state.rate = state.peak_rate * CUBIC_BETA  # CUBIC's W(0)
        if self.rate_ceiling is not None:
            state.rate = min(state.rate or self.rate_ceiling, self.rate_ceiling)

    def _rate_found(self, now: float, successes: int) -> float:
        """CUBIC's W_max at a throttle after the first: the rate the target was found to serve.

        A throttle within `EARLY_THROTTLE_S` of a paced episode's start measures little: the target
        served its bucket and a few more, and a bucket's worth arriving bunched (the client's or the
        network's jitter: 15 ms of a busy event loop) draws a 429 from a target the client paced
        below its rate; the estimate then reads far below the rate it was paced at (a third, at
        500/s), and CUBIC takes its 10 s to grow back. So such a throttle cuts the rate by at most
        `EARLY_THROTTLE_FACTOR`: a target whose rate really fell throttles again in the next episode,
        later, where its rate can be measured."""
        state = self.state
        rate = state.rate or MIN_RATE
        if not successes:
            return rate * BLIND_RATE_FACTOR  # nothing served to measure by
        found = self._served_rate(now)
        if not state.discovering and now - state.episode_start < EARLY_THROTTLE_S:
            return max(found or 0.0, rate * EARLY_THROTTLE_FACTOR)
        return found if found is not None else rate * BLIND_RATE_FACTOR

    def _open_bucket(self, now: float) -> None:
        """Close the open bucket of successes and open one with this success; forget those out of the window."""
        state = self.state
        buckets = state.success_buckets
        if state.bucket_count:
            buckets.append((state.bucket_start, state.bucket_count))
        state.bucket_start, state.bucket_count = now, 1
        while buckets and buckets[0][0] < now - ESTIMATE_WINDOW_S:
            buckets.popleft()

    def _buckets(self, now: float) -> list[tuple[float, int]]:
        """The episode's successes in the window, as (bucket start, count), oldest first."""
        state = self.state
        kept = [(start, count) for start, count in state.success_buckets if start >= now - ESTIMATE_WINDOW_S]
        if state.bucket_count:
            kept.append((state.bucket_start, state.bucket_count))
        return kept

    def _served_rate(self, now: float) -> float | None:
        """A lower bound of the target's rate: the most successes over a window ending now, less a full
        bucket's, per second (a bucket of B holds B at most, so S(window) <= B + rate x span). Windows
        start where a bucket of successes starts, so a span is never shorter than it was. B is what the
        first episode was served: all of a full bucket when that episode fits the window (first
        contact, a fast target); a long first episode can leave it short, and the next throttle
        corrects an estimate that came out high. (B is not padded by the token's fraction the first
        episode may have left: that made the estimate 1/span too low, at 20/s a fifth of the rate.)"""
        state = self.state
        free = state.free or 0
        best = None
        served = 0
        for start, count in reversed(self._buckets(now)):
            served += count
            span = now - start
            if span >= ESTIMATE_MIN_SPAN_S and served > free:
                rate = (served - free) / span
                best = rate if best is None else max(best, rate)
        if best is not None and state.rate is not None:
            best = min(best, state.rate)
        return best

    # --- the circuit ------------------------------------------------------------------------------

    def _failed(self, now: float, probe: bool) -> None:
        state = self.state
        state.failures_in_a_row += 1
        if probe or state.failures_in_a_row >= self.circuit_failures:
            if state.circuit is not Circuit.OPEN:
                state.circuit_opened += 1
            state.circuit = Circuit.OPEN
            state.circuit_until = now + self.circuit_cool_down_s

    def counters(self) -> Counters:
        state = self.state
        return Counters(state.throttled_answers, state.pauses, state.circuit_opened)

    def report(self, since: Counters) -> TargetReport:
        """This target in a call's summary: what happened since `since` (the call's start), and where
        its limits stand now."""
        state = self.state
        now = self.counters()
        return TargetReport(
            throttled=now.throttled - since.throttled,
            pauses=now.pauses - since.pauses,
            circuit_opened=now.circuit_opened - since.circuit_opened,
            limit=int(state.limit),
            rate_per_s=None if state.rate is None else round(state.rate, 1),
            circuit=state.circuit.value,
        )


class Counters(NamedTuple):
    """A target's running counts, read at a call's start so that the call reports only its own."""

    throttled: int
    pauses: int
    circuit_opened: int


NO_COUNTS = Counters(0, 0, 0)


class TargetReport(NamedTuple):
    """One target in one call's summary and metrics."""

    throttled: int  # answers 429 or 503
    pauses: int  # Retry-After pauses that began
    circuit_opened: int
    limit: int  # requests in flight it may have now
    rate_per_s: float | None  # starts per second it is paced to now; None: not paced
    circuit: str


NO_TARGETS: Mapping[str, TargetReport] = MappingProxyType({})  # a call that reached no target


class Politeness:
    """The limiters of one container, by target name, created on first use and kept across calls."""

    def __init__(
        self,
        *,
        ceiling: int,
        max_in_flight: Mapping[str, int] | None = None,
        rate_per_s: Mapping[str, float] | None = None,
        circuit_failures: int = CIRCUIT_THRESHOLD,
        circuit_cool_down_s: float = CIRCUIT_COOL_DOWN_S,
    ) -> None:
        self.ceiling = ceiling  # the function's FANOUT_MAX_CONCURRENCY
        self.circuit_failures = circuit_failures
        self.circuit_cool_down_s = circuit_cool_down_s
        self.max_in_flight = dict(max_in_flight or {})  # a target's own ceilings (FANOUT_UPSTREAMS)
        self.rate_per_s = dict(rate_per_s or {})
        self.limiters: dict[str, TargetLimiter] = {}

    def __repr__(self) -> str:
        return f"Politeness(ceiling={self.ceiling}, targets={sorted(self.limiters)})"

    def counters(self) -> dict[str, Counters]:
        """Every target's counts now: give them back to `report` after the call."""
        return {name: limiter.counters() for name, limiter in self.limiters.items()}

    def report(self, targets: Iterable[str], since: Mapping[str, Counters]) -> dict[str, TargetReport]:
        """The call's targets as its summary shows them. A container serves one call at a time on
        Lambda, so the difference of the counts is this call's."""
        return {name: self.limiter(name).report(since.get(name, NO_COUNTS)) for name in sorted(set(targets))}

    def configured(self, target: str) -> tuple[int, float | None]:
        """The target's ceilings as configured: in flight, and requests per second (None: unpaced)."""
        return min(self.ceiling, self.max_in_flight.get(target, self.ceiling)), self.rate_per_s.get(target)

    def limiter(self, target: str) -> TargetLimiter:
        limiter = self.limiters.get(target)
        if limiter is None:
            ceiling, rate_ceiling = self.configured(target)
            limiter = self.limiters[target] = TargetLimiter(
                target,
                ceiling=ceiling,
                rate_ceiling=rate_ceiling,
                circuit_failures=self.circuit_failures,
                circuit_cool_down_s=self.circuit_cool_down_s,
            )
        return limiter


def retry_after_seconds(value: str | None, *, now: float | None = None) -> float | None:
    """Retry-After in seconds, from delta-seconds or an HTTP date (RFC 9110 10.2.3); None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit() also takes "²" and other digits float() refuses
        return min(float(value), RETRY_AFTER_MAX_S)
    try:
        moment = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return min(max(0.0, moment - (time.time() if now is None else now)), RETRY_AFTER_MAX_S)
