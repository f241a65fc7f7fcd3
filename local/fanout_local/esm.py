"""The local stand-in for Lambda's SQS event source mapping (moto's ignores ScalingConfig and partial
batch responses, and its Lambda needs Docker).

Per mapping, `maximum_concurrency` pollers (ScalingConfig.MaximumConcurrency): each
long-polls the queue for up to `batch_size` messages, invokes the function with the
SQS event Lambda would build, and deletes the messages the function did not report in
`batchItemFailures`. A function that fails, times out or dies leaves the whole batch:
it comes back after the queue's visibility timeout, and after the queue's
maxReceiveCount, SQS's redrive moves it to the dead-letter queue, as on AWS.
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

from fanout_local.pool import FunctionPool
from fanout_local.template import QueueSource

WAIT_S = 1  # long polling: an idle poller asks again every second, and stops within that


def sqs_event(messages: list[dict[str, Any]], queue_arn: str, region: str) -> dict[str, Any]:
    """The event an SQS event source mapping invokes a function with."""
    return {
        "Records": [
            {
                "messageId": message["MessageId"],
                "receiptHandle": message["ReceiptHandle"],
                "body": message["Body"],
                "attributes": message.get("Attributes", {}),
                "messageAttributes": message.get("MessageAttributes", {}),
                "md5OfBody": message.get("MD5OfBody") or hashlib.md5(message["Body"].encode()).hexdigest(),
                "eventSource": "aws:sqs",
                "eventSourceARN": queue_arn,
                "awsRegion": region,
            }
            for message in messages
        ]
    }


class QueuePoller:
    """One function's event source mapping on one queue."""

    def __init__(
        self,
        sqs: Any,
        *,
        queue_url: str,
        queue_arn: str,
        region: str,
        source: QueueSource,
        pool: FunctionPool,
    ) -> None:
        self.sqs = sqs
        self.queue_url = queue_url
        self.queue_arn = queue_arn
        self.region = region
        self.source = source
        self.pool = pool
        self._stopping = threading.Event()
        self._threads = [
            threading.Thread(target=self._poll, name=f"esm-{source.queue}-{i}", daemon=True)
            for i in range(source.maximum_concurrency)
        ]
        self.invocations = 0
        self.failed_invocations = 0

    def __repr__(self) -> str:
        return f"QueuePoller({self.source.queue} -> {self.pool.function.name})"

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=WAIT_S + 5)

    def _poll(self) -> None:
        while not self._stopping.is_set():
            try:
                messages = self.sqs.receive_message(
                    QueueUrl=self.queue_url,
                    MaxNumberOfMessages=self.source.batch_size,
                    WaitTimeSeconds=WAIT_S,
                    AttributeNames=["All"],
                    MessageAttributeNames=["All"],
                ).get("Messages", [])
            except Exception:  # the stack is stopping, or hiccupped: ask again
                time.sleep(WAIT_S)
                continue
            if messages:
                self._deliver(messages)

    def _deliver(self, messages: list[dict[str, Any]]) -> None:
        event = sqs_event(messages, self.queue_arn, self.region)
        self.invocations += 1
        try:
            with self.pool.container() as container:
                result = container.invoke(event, self.pool.function.timeout_s)
        except Exception:  # the function failed, timed out or died: the whole batch comes back later
            self.failed_invocations += 1
            return
        failed = set()
        if self.source.report_failures and isinstance(result, dict):
            failed = {item["itemIdentifier"] for item in result.get("batchItemFailures") or []}
        done = [message for message in messages if message["MessageId"] not in failed]
        if done:
            self.sqs.delete_message_batch(
                QueueUrl=self.queue_url,
                Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)],
            )
