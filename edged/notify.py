"""systemd's sd_notify protocol over `$NOTIFY_SOCKET`: a datagram of `KEY=value` lines.

Plain socket code; the protocol is four lines of spec and a dependency would be
heavier than the feature. Outside systemd every call is a no-op.
"""

from __future__ import annotations

import os
import socket

STATE_SEND_TIMEOUT_S = 2.0


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

        Called on the event loop, so it must never block for long: a receiver that does not
        read fills its datagram queue (10 by default). Pings and status lines are dropped
        then (the next one says the same); a state change (READY, STOPPING, RELOADING)
        waits at most STATE_SEND_TIMEOUT_S for room, since systemd acts on it.
        """
        if not self._addr:
            return
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        routine = set(fields) <= {"WATCHDOG", "STATUS"}
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.settimeout(0.0 if routine else STATE_SEND_TIMEOUT_S)
                s.sendto(payload, self._addr)
        except OSError:
            pass
