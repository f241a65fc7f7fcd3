"""Lambda entry point of the jobs worker: batches of chunk-queue messages (and of its dead letters).

The container keeps one event loop, one pooled client and the targets' limiters from
cold start to its end, as the API functions do; the collector is off while the cold
start builds them, and `gc.freeze()` keeps what it built out of every later collection
(functions/api/app.py says why).
"""

import gc

gc.disable()
try:
    from fanout import install_event_loop, load_settings
    from fanout.jobs.worker import Worker, lambda_memory_mb

    install_event_loop()
    settings = load_settings()
    handler = Worker(settings, timeout_s=settings.worker_timeout_s, memory_mb=lambda_memory_mb()).handle
    gc.freeze()
finally:
    gc.enable()
