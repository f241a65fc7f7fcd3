"""Lambda entry point of every fanout function: the app behind Mangum.

Lifespan is off because Mangum would run it on every invocation; the pooled
client lives on the app instead and survives warm invocations. The wrappers
refuse events that are not API Gateway requests with an error that says so, and
put the invocation's request ids on every log line.

Everything built at cold start lives as long as the container, so the collector has
nothing to find while it is built: it is off until the end of the cold start (the
collections it ran among the imports were some 30 ms of a 300 ms cold start), and
`gc.freeze()` then moves all of it out of the collector's sight, so a full collection
during a call no longer walks some 90,000 objects (about 5 ms of a 1,000-request call to
a fast target). No collection runs before the freeze, as Python's documentation of
`gc.freeze` has it for a fork server: it would walk every one of those objects (some
27 ms) to free about 160 KB that the imports left in cycles, kept instead for the
container's life.
"""

import gc

gc.disable()
try:
    from mangum import Mangum

    from fanout import api_gateway_requests_only, create_app, install_event_loop, observe_invocations

    install_event_loop()
    app = create_app()
    handler = api_gateway_requests_only(observe_invocations(Mangum(app, lifespan="off"), app.state.telemetry))
    gc.freeze()
finally:
    gc.enable()  # also when the cold start fails: a test importing this again keeps its collector
