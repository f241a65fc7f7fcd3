"""What `make run` prints of the functions' output: one readable line per call.

On Lambda each function writes JSON log lines (fanout.observability) and EMF metric
lines. Locally those are kept out of the way: a call's failure lines are counted and
its summary line becomes one line, e.g.

    14:02:11 SemaphoreFunction  semaphore n=100 k=10: 100 ok, 0 failed, 0 skipped in 523 ms

`--raw-logs` prints every line as the function wrote it instead (as CloudWatch gets it).
Anything that is not a JSON log line (a traceback, a print) is shown as it is.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import Counter, defaultdict
from typing import TextIO


class Console:
    def __init__(self, *, raw: bool = False, stream: TextIO | None = None) -> None:
        self.raw = raw
        self.stream = stream or sys.stdout
        self._failures: dict[str, Counter[str]] = defaultdict(Counter)
        self._lock = threading.Lock()

    def function_output(self, function: str, line: str) -> None:
        """One line a function process wrote."""
        if self.raw:
            return self._print(f"{function:<18}| {line.rstrip()}")
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            return self._print(f"{function:<18}| {line.rstrip()}")
        if "_aws" in record:
            return None  # an EMF metric line: CloudWatch's, not a reader's
        message = record.get("message")
        if message == "upstream request failed":
            self._failures[function][str(record.get("error_type"))] += 1
            return None
        if message == "fanout call":
            return self._print(f"{time.strftime('%H:%M:%S')} {function:<18} {self._summary(function, record)}")
        return self._print(f"{time.strftime('%H:%M:%S')} {function:<18} {record.get('level', '')} {message}")

    def _summary(self, function: str, record: dict[str, object]) -> str:
        failures = self._failures.pop(function, Counter())
        kinds = ", ".join(f"{count} {kind}" for kind, count in failures.most_common())
        return (
            f"{record.get('strategy')} n={record.get('n')} k={record.get('concurrency')}: "
            f"{record.get('succeeded')} ok, {record.get('failed')} failed, {record.get('skipped')} skipped "
            f"in {float(record.get('elapsed_ms') or 0):.0f} ms" + (f" ({kinds})" if kinds else "")
        )

    def _print(self, text: str) -> None:
        with self._lock:
            print(text, file=self.stream, flush=True)
