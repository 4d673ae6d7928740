"""sd_notify must never stall the event loop, even when nobody reads the socket."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from edged.notify import Notifier


def test_pings_to_a_receiver_that_does_not_read_never_block(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        done = threading.Event()

        def ping() -> None:
            for _ in range(200):  # far past the kernel's datagram queue (10 by default)
                notifier.send(WATCHDOG="1")
                notifier.send(STATUS="backlog 0")
            done.set()

        t = threading.Thread(target=ping, daemon=True)
        t.start()
        assert done.wait(30), "send() blocked on a full notify socket"
        t.join(5)
        listener.settimeout(5)
        assert listener.recv(4096) in (b"WATCHDOG=1", b"STATUS=backlog 0")


def test_state_change_waits_for_room_when_the_receiver_reads(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(path))
        listener.settimeout(10)
        notifier = Notifier({"NOTIFY_SOCKET": str(path)})
        for _ in range(50):
            notifier.send(WATCHDOG="1")  # the queue is full now
        sent = threading.Event()

        def stop() -> None:
            notifier.send(STOPPING="1")
            sent.set()

        t = threading.Thread(target=stop, daemon=True)
        t.start()
        seen: list[bytes] = []
        while b"STOPPING=1" not in seen and len(seen) < 100:
            seen.append(listener.recv(4096))
        assert b"STOPPING=1" in seen
        assert sent.wait(10)
        t.join(5)
