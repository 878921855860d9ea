"""The lean HTTP/1.1 upstream client against raw sockets: framing, keep-alive, failures."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from costwarden.gateway.http1 import Http1Upstream
from costwarden.gateway.upstream import UpstreamUnavailableError

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return head + await reader.readexactly(length)


def run(handler: Handler, scenario: Callable[[str, Http1Upstream], Awaitable[object]]) -> object:
    async def main() -> object:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = Http1Upstream()
        try:
            return await scenario(f"http://127.0.0.1:{port}/v1/chat/completions", client)
        finally:
            await client.close()
            server.close()

    return asyncio.run(main())


def test_keep_alive_reuses_one_connection() -> None:
    connections: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        while True:
            try:
                request = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            assert b"POST /v1/chat/completions HTTP/1.1" in request
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
            )
            await writer.drain()

    async def scenario(url: str, client: Http1Upstream) -> list[bytes]:
        return [await (await client.post(url, {"X-A": "1"}, b"{}")).read() for _ in range(3)]

    assert run(handler, scenario) == [b"{}", b"{}", b"{}"]
    assert len(connections) == 1


def test_chunked_answer_streams_in_parts() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for event in (b"data: 1\n\n", b"data: 2\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def scenario(url: str, client: Http1Upstream) -> tuple[str, bytes]:
        response = await client.post(url, {}, b"{}")
        return response.content_type, b"".join([c async for c in response.chunks()])

    assert run(handler, scenario) == ("text/event-stream", b"data: 1\n\ndata: 2\n\n")


def test_body_delimited_by_connection_close() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nwhole body")
        await writer.drain()
        writer.close()

    async def scenario(url: str, client: Http1Upstream) -> bytes:
        return await (await client.post(url, {}, b"{}")).read()

    assert run(handler, scenario) == b"whole body"


def test_a_keep_alive_connection_the_server_dropped_is_not_a_failure() -> None:
    # Whether the close arrives before the next request (the pool discards it) or after it
    # was sent (the request is retried once on a fresh connection), the caller sees success.
    served: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        served.append(1)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # keep-alive promised, then the server drops the idle connection

    async def scenario(url: str, client: Http1Upstream) -> list[bytes]:
        first = await (await client.post(url, {}, b"{}")).read()
        second = await (await client.post(url, {}, b"{}")).read()
        return [first, second]

    assert run(handler, scenario) == [b"ok", b"ok"]
    assert len(served) == 2


def test_unreachable_upstream_raises_unavailable() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def scenario(url: str, client: Http1Upstream) -> object:
        return await client.post("http://127.0.0.1:1/v1/x", {}, b"{}")

    with pytest.raises(UpstreamUnavailableError):
        run(handler, scenario)


def test_header_values_cannot_smuggle_lines() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def scenario(url: str, client: Http1Upstream) -> object:
        return await client.post(url, {"anthropic-beta": "x\r\nX-Evil: 1"}, b"{}")

    with pytest.raises(ValueError, match="line break"):
        run(handler, scenario)
