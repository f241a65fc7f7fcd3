"""Lambda entry point of the jobs worker: batches of chunk-queue messages (and of its dead letters).

The container keeps one event loop, one pooled client and the targets' limiters from
cold start to its end, as the API functions do; `gc.freeze()` keeps what the cold
start built out of every later collection.
"""

import gc

from fanout import install_event_loop, load_settings
from fanout.jobs.worker import Worker

install_event_loop()
settings = load_settings()
handler = Worker(settings, timeout_s=settings.worker_timeout_s).handle
gc.freeze()
