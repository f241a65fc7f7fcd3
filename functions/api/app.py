"""Lambda entry point of every fanout function: the app behind Mangum.

Lifespan is off because Mangum would run it on every invocation; the pooled
client lives on the app instead and survives warm invocations. The wrapper puts
the invocation's request ids on every log line.
"""

from mangum import Mangum

from fanout import create_app, install_event_loop, observe_invocations

install_event_loop()
app = create_app()
handler = observe_invocations(Mangum(app, lifespan="off"), app.state.telemetry)
