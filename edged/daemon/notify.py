"""systemd's sd_notify protocol over `$NOTIFY_SOCKET`: a datagram of `KEY=value` lines.

Plain socket code; the protocol is four lines of spec and a dependency would be
heavier than the feature. Outside systemd every call is a no-op.
"""

from __future__ import annotations

import os
import socket

# Sent again every watchdog tick: when systemd's queue is full it already holds a ping,
# so one is dropped rather than block the event loop on a slow reader.
PERIODIC = frozenset({"WATCHDOG", "STATUS"})
# State changes (READY, STOPPING, RELOADING) wait this long for room, then are dropped.
STATE_SEND_TIMEOUT_S = 5.0


def send_timeout_s(fields: frozenset[str]) -> float:
    """0 (never wait) for periodic fields only; bounded wait for anything else."""
    return 0.0 if fields <= PERIODIC else STATE_SEND_TIMEOUT_S


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        wanted = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        # Ping at half the watchdog period, as sd_watchdog_enabled(3) recommends.
        self.watchdog_interval_s: float | None = int(usec) / 2e6 if wanted else None

    @property
    def enabled(self) -> bool:
        return bool(self._addr)

    def send(self, **fields: str) -> None:
        """e.g. send(READY="1", STATUS="backlog 0"); errors are swallowed: systemd may be gone.
        Never blocks for long: it runs on the event loop, and a datagram socket whose reader
        lags (queue of 10 by default) would otherwise stall the daemon in sendto."""
        if not self._addr:
            return
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.settimeout(send_timeout_s(frozenset(fields)))
                s.sendto(payload, self._addr)
        except OSError:  # includes the timeout and EAGAIN: the message is dropped
            pass
