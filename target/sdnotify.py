"""systemd's notify protocol (sd_notify(3)), spoken directly: one datagram
of NEWLINE-separated KEY=VALUE lines to the AF_UNIX socket named by
NOTIFY_SOCKET ("@name" for the abstract namespace). Without NOTIFY_SOCKET
(not started by systemd with Type=notify) every call does nothing.

The daemon tells systemd READY=1 once it serves, RELOADING=1 ... READY=1
around a reload, STOPPING=1 when it starts to stop, and STATUS= lines that
`systemctl status` shows ("restoring db1-clone 42%").
"""
from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        addr = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self.address = ("\0" + addr[1:]) if addr and addr.startswith("@") else addr
        self._sock: socket.socket | None = None
        self._status: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def send(self, *lines: str) -> None:
        if not self.address:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)     # never wait on systemd from the event loop
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as e:
            # systemd gone or its queue full: the service works on regardless
            log.debug("sd_notify %s failed: %s", lines[0] if lines else "", e)

    def ready(self, status: str | None = None) -> None:
        self.send("READY=1", *self._status_line(status))

    def reloading(self) -> None:
        # systemd >= 253 (Type=notify-reload) wants the monotonic time with it
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping: draining I/O, flushing, persisting")

    def status(self, text: str) -> None:
        """Send STATUS= only when it changed: the status task calls this often."""
        line = self._status_line(text)
        if line:
            self.send(*line)

    def _status_line(self, text: str | None) -> list[str]:
        if text is None or text == self._status:
            return []
        self._status = text
        return [f"STATUS={text}"]

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
