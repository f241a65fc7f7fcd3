"""Cut a job's input file into chunk messages: in a worker, after POST /jobs has answered.

The file is read a block at a time (a file of any size costs a block of memory, a line
longer than the cap is counted, never held), and every `chunk_items` non-blank lines
become one `RunChunk`: a byte range and the number of its first line. A chunk also ends
before its lines would pass CHUNK_LINE_BYTES, so that what a worker holds of its input
is bounded whatever the lines' lengths. Nothing is parsed here: a bad line (one past
the cap included) is its item's error, reported by the chunk that holds it. Messages
go out ten at a time, and the count sent is recorded, so a split that SQS delivers
again goes on where the last one stopped instead of sending chunks twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fanout.jobs import messages
from fanout.jobs.files import JobFiles, Line
from fanout.jobs.messages import RunChunk, SplitInput
from fanout.jobs.store import JobStatus, JobStore

SEND_EVERY = 100  # chunk messages sent (and recorded as sent) at a time
CHUNK_LINE_BYTES = 16 << 20  # the lines of one chunk at most (one line past the cap counts none)


@dataclass(frozen=True)
class SplitQueue:
    sqs: object
    url: str


def split_input(
    message: SplitInput,
    *,
    store: JobStore,
    files: JobFiles,
    queue: SplitQueue,
    chunk_items: int,
    max_items: int,
    max_line_bytes: int,
    now_ms: Callable[[], int],
) -> None:
    job = store.get(message.job_id)
    if job is None:
        return  # expired, or never created: nothing to do
    if job["status"] == JobStatus.CANCELLED:
        store.split_done(message.job_id, total=0, chunks=0, now_ms=now_ms())  # cancelled before it began
        return
    if job["status"] == JobStatus.QUEUED:
        store.start(message.job_id, now_ms())
    cutter = _Cutter(message, already_sent=int(job["split_sent"]), chunk_items=chunk_items)
    for line in files.read_lines(message.key, max_line_bytes):
        if cutter.total == max_items and not line.blank:
            cutter.close()
            cutter.send(store, queue)
            reason = f"the input has more than {max_items} items (FANOUT_MAX_JOB_ITEMS); the first {max_items} ran"
            store.fail_input(message.job_id, reason, total=cutter.total, chunks=cutter.chunks, now_ms=now_ms())
            return
        cutter.add(line)
        if len(cutter.pending) >= SEND_EVERY:
            cutter.send(store, queue)
    cutter.close()
    cutter.send(store, queue)
    store.split_done(message.job_id, total=cutter.total, chunks=cutter.chunks, now_ms=now_ms())


class _Cutter:
    """Lines in, chunks out: every `chunk_items` non-blank lines (fewer if they would pass
    CHUNK_LINE_BYTES), a byte range and its first line's number."""

    def __init__(self, message: SplitInput, *, already_sent: int, chunk_items: int) -> None:
        self.message = message
        self.already_sent = already_sent  # a split delivered again sends only what the last did not
        self.chunk_items = chunk_items
        self.pending: list[RunChunk] = []
        self.total = 0
        self.chunks = 0
        self._line = 0
        self._start: int | None = None
        self._first_line = 0
        self._end = 0
        self._items = 0
        self._held = 0  # bytes of the chunk's lines a worker will hold

    def add(self, line: Line) -> None:
        self._line += 1
        if line.blank:
            return
        held = 0 if line.data is None else line.length
        if self._items and self._held + held > CHUNK_LINE_BYTES:
            self.close()
        if self._start is None:
            self._start, self._first_line = line.offset, self._line
        self._end = line.offset + line.length + 1
        self._items += 1
        self._held += held
        self.total += 1
        if self._items == self.chunk_items:
            self.close()

    def close(self) -> None:
        if self._start is None:
            return
        if self.chunks >= self.already_sent:
            chunk = RunChunk(
                job_id=self.message.job_id,
                index=self.chunks,
                key=self.message.key,
                start=self._start,
                end=self._end,
                first_line=self._first_line,
                items=self._items,
            )
            self.pending.append(chunk)
        self.chunks += 1
        self._start, self._items, self._held = None, 0, 0

    def send(self, store: JobStore, queue: SplitQueue) -> None:
        if self.pending:
            messages.send(queue.sqs, queue.url, self.pending)
            store.split_progress(self.message.job_id, self.pending[-1].index + 1)
            self.pending = []
