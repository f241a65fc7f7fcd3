"""Lambda entry point of every fanout function: the app behind Mangum.

Lifespan is off because Mangum would run it on every invocation; the pooled
client lives on the app instead and survives warm invocations.
"""

from mangum import Mangum

from fanout import create_app, install_event_loop

install_event_loop()
handler = Mangum(create_app(), lifespan="off")
