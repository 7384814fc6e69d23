"""The one free-port probe and the loopback form of bind-all URLs."""

from __future__ import annotations

import socket

from serving.ports import free_port, free_ports, local_url, port_free


def test_a_listening_port_is_busy_and_a_closed_one_free() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert not port_free("127.0.0.1", port)
    assert port_free("127.0.0.1", port)  # closed again (SO_REUSEADDR: TIME_WAIT does not count)
    assert port_free("127.0.0.1", free_port())


def test_free_ports_are_distinct() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5 and all(port_free("127.0.0.1", p) for p in ports)


def test_local_url_turns_bind_all_addresses_into_loopback() -> None:
    assert local_url("http://0.0.0.0:8081") == "http://127.0.0.1:8081"
    assert local_url("http://[::]:8081/models") == "http://[::1]:8081/models"
    assert local_url("http://127.0.0.1:8081") == "http://127.0.0.1:8081"
    assert local_url("http://torchserve:8081") == "http://torchserve:8081"
