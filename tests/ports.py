"""Free loopback ports for the servers a test starts (Orthanc, web, metrics, listeners, proxies).

The kernel hands out ephemeral ports in turn and may give the same one to two probes once the
first probe's socket is closed, so two ports asked for in a row (Orthanc's HTTP and DICOM ports,
say) could collide. Every port handed out in this test process is remembered and never given again.
"""

from __future__ import annotations

import socket

_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback TCP port nothing listens on now and that no earlier call in this process returned."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
