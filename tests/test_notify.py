"""sd_notify against a real datagram socket whose reader lags, as a busy systemd may."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edged.daemon.notify import STATE_SEND_TIMEOUT_S, Notifier, send_timeout_s


@pytest.mark.parametrize(
    "fields,timeout",
    [
        ({"WATCHDOG"}, 0.0),
        ({"STATUS"}, 0.0),
        ({"WATCHDOG", "STATUS"}, 0.0),
        ({"READY", "STATUS"}, STATE_SEND_TIMEOUT_S),
        ({"STOPPING"}, STATE_SEND_TIMEOUT_S),
        ({"RELOADING"}, STATE_SEND_TIMEOUT_S),
    ],
)
def test_only_periodic_fields_are_sent_without_waiting(fields: set[str], timeout: float) -> None:
    assert send_timeout_s(frozenset(fields)) == timeout


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(10)
    yield sock
    sock.close()  # also wakes a sender still blocked on it


def _in_thread(fn: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=fn, daemon=True)
    thread.start()
    return thread


def test_pings_to_an_unread_socket_never_block_and_stopping_waits_for_room(
    tmp_path: Path, listener: socket.socket
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})

    def ping() -> None:
        for _ in range(200):  # far past the kernel's queue (net.unix.max_dgram_qlen, 10)
            notifier.send(WATCHDOG="1")
            notifier.send(STATUS="backlog 0")

    pinger = _in_thread(ping)
    pinger.join(10)  # a bound, not a timing: on the event loop this must not block at all
    assert not pinger.is_alive(), "send() blocked on a notify socket nobody reads"
    # The queue is full of pings; a state change waits for systemd to make room.
    stopper = _in_thread(lambda: notifier.send(STOPPING="1"))
    seen: list[str] = []
    for _ in range(1000):  # bounded: the queue holds at most a few hundred pings
        seen.append(listener.recv(4096).decode())
        if seen[-1] == "STOPPING=1":
            break
    stopper.join(10)
    assert seen[-1] == "STOPPING=1"
    assert set(seen[:-1]) <= {"WATCHDOG=1", "STATUS=backlog 0"}
