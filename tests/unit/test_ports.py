import socket

from costwarden.ports import _ephemeral_start, free_port, free_ports


def test_ports_are_distinct_free_and_below_the_ephemeral_range():
    ports = free_ports(20)
    assert len(set(ports)) == 20
    assert all(10_000 <= port < _ephemeral_start() for port in ports)
    for port in ports:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", port))  # free, as promised


def test_a_port_someone_listens_on_is_never_returned():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port()))
        taken.listen()
        busy = taken.getsockname()[1]
        assert busy not in free_ports(200)
