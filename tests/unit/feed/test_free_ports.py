"""free_ports: consecutive free ports for a platform's API and the listeners after it, below
the kernel's ephemeral range (where outgoing connections take theirs)."""

from __future__ import annotations

import socket
from pathlib import Path

from feed.broker import free_ports


def test_consecutive_free_ports_below_the_ephemeral_range() -> None:
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(20):
        base = free_ports(6)
        assert base >= 1024 and base + 6 <= ephemeral_low
        socks = []
        try:
            for port in range(base, base + 6):  # each one can be listened on now
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
                sock.listen()
        finally:
            for sock in socks:
                sock.close()


def test_a_taken_port_is_never_inside_the_range() -> None:
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        taken.bind(("127.0.0.1", free_ports(1)))
        taken.listen()
        port = taken.getsockname()[1]
        for _ in range(200):
            base = free_ports(64)
            assert not base <= port < base + 64
    finally:
        taken.close()
