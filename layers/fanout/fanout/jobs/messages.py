"""The chunk queue's messages: a few hundred bytes each, pointing at S3, never carrying items.

`SplitInput` asks a worker to cut a job's input file into chunks; `RunChunk` is one
chunk: a byte range of the input file holding whole lines. Both are JSON with a
`kind`, parsed strictly: a message that is not one of them is refused (and so ends
in the dead-letter queue rather than being taken for something else).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class SplitInput:
    job_id: str
    key: str  # the input file in the input bucket


@dataclass(frozen=True, slots=True)
class RunChunk:
    job_id: str
    index: int  # 0, 1, ...: the chunk's place in the job, and in its results key
    key: str  # the input file
    start: int  # byte offsets: [start, end) holds whole lines
    end: int
    first_line: int  # the 1-based line number of its first line
    items: int  # its non-blank lines: what it must account for, even when its lines cannot be read


Message = SplitInput | RunChunk
_KINDS: dict[str, type[SplitInput] | type[RunChunk]] = {"split": SplitInput, "chunk": RunChunk}


def encode(message: Message) -> str:
    kind = "split" if isinstance(message, SplitInput) else "chunk"
    return json.dumps({"kind": kind, **asdict(message)}, separators=(",", ":"))


def decode(body: str) -> Message:
    """The message in an SQS body; ValueError saying why if it is not one of ours."""
    try:
        fields: Any = json.loads(body)
        kind = _KINDS[fields.pop("kind")]
        return kind(**fields)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a chunk queue message: {body[:200]!r}") from exc


SQS_BATCH = 10  # SendMessageBatch's most entries


def send(sqs: Any, queue_url: str, messages: list[Message]) -> None:
    """Send, ten to a call; an entry SQS refuses is sent again (once), else the call raises."""
    for start in range(0, len(messages), SQS_BATCH):
        entries = [
            {"Id": str(position), "MessageBody": encode(message)}
            for position, message in enumerate(messages[start : start + SQS_BATCH])
        ]
        for _ in range(2):
            failed = sqs.send_message_batch(QueueUrl=queue_url, Entries=entries).get("Failed", [])
            if not failed:
                break
            refused = {entry["Id"] for entry in failed}
            entries = [entry for entry in entries if entry["Id"] in refused]
        else:
            raise RuntimeError(f"SQS refused {len(entries)} chunk messages twice: {failed}")
