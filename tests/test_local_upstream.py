"""The bundled upstream itself: it stops cleanly whatever its clients left half-answered.

Every test that starts one (`running_in_thread`) stops it at teardown, so a stop that fails
fails that test, whatever it asserted.
"""

from __future__ import annotations

import socket

import pytest

from fanout_local.upstream import running_in_thread

#: Far more than the socket buffers between the two ends hold: an endless body read this far never stopped.
UNSTOPPED_BYTES = 64 * 2**20


# A stop that waits on the unread bytes hangs in uvloop's close, in C, where no signal reaches: the
# thread method ends the run with the stacks printed, in 30 s rather than the suite's 120.
@pytest.mark.timeout(30, method="thread")
def test_it_stops_while_a_client_that_stopped_reading_holds_an_endless_body() -> None:
    with running_in_thread(delay_ms=0) as upstream:
        client = socket.create_connection(("127.0.0.1", upstream.port), timeout=10)
        client.sendall(b"GET /endless HTTP/1.1\r\nhost: upstream\r\n\r\n")
        head = client.recv(64)
        # Unread, its next chunks fill the socket buffers: a write stays pending in the upstream, and
        # leaving this block stops it so. That hung uvloop's close here; where the client had closed
        # instead (the transports' test of a cut endless body), it failed it with EBUSY one run in five.
    with client:
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert _read_to_the_end(client) < UNSTOPPED_BYTES  # what the buffers held, then the end


def _read_to_the_end(client: socket.socket) -> int:
    """Bytes read until the peer closed or reset the connection (a timeout raises)."""
    read = 0
    try:
        while read < UNSTOPPED_BYTES and (chunk := client.recv(1 << 20)):
            read += len(chunk)
    except ConnectionResetError:
        pass
    return read
