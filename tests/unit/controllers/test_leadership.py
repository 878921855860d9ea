from datetime import UTC, datetime, timedelta

from costwarden.controllers.leadership import is_highest_live_peer

NOW = datetime(2026, 11, 25, 12, tzinfo=UTC)


def peer(priority: int, seen_ago: float = 1, lifetime: int = 60) -> dict:
    seen = (NOW - timedelta(seconds=seen_ago)).isoformat()
    return {"priority": priority, "lastseen": seen, "lifetime": lifetime}


def test_highest_priority_live_peer_leads():
    peers = {"me": peer(10), "other": peer(5)}
    assert is_highest_live_peer(peers, "me", 10, NOW)
    assert not is_highest_live_peer(peers, "other", 5, NOW)


def test_a_tie_pauses_everyone_as_kopf_does():
    assert not is_highest_live_peer({"me": peer(7), "twin": peer(7)}, "me", 7, NOW)


def test_dead_peers_do_not_count():
    peers = {"me": peer(1), "gone": peer(99, seen_ago=120)}
    assert is_highest_live_peer(peers, "me", 1, NOW)


def test_alone_means_leader():
    assert is_highest_live_peer({}, "me", 1, NOW)


def test_an_unreachable_api_server_pauses_the_replica_instead_of_raising():
    """A connection error (urllib3's MaxRetryError while the API server is down) once
    escaped is_leader() and ended the reconciler task for good."""
    import asyncio

    from kubernetes import client
    from urllib3.exceptions import MaxRetryError

    from costwarden.controllers.leadership import Leadership

    class DownApi:
        def get_cluster_custom_object(self, *args: object) -> None:
            raise MaxRetryError(None, "/apis/kopf.dev", "connection refused")  # type: ignore[arg-type]

    leadership = Leadership(client.ApiClient(), peering_name="p", identity="me", priority=1)
    leadership._custom = DownApi()  # type: ignore[assignment]
    assert asyncio.run(leadership.is_leader()) is False
