"""A userspace service proxy (kube-proxy's old ``userspace`` mode): one asyncio listener
per Service port on the Service's ClusterIP, each connection forwarded to a ready
endpoint, round-robin, trying the next one if a connect fails."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

Backend = tuple[str, int]
_CONNECT_TIMEOUT = 3.0
_CHUNK = 65536


@dataclass
class _Listener:
    server: asyncio.AbstractServer
    backends: list[Backend] = field(default_factory=list)
    counter: itertools.count[int] = field(default_factory=itertools.count)


class ServiceProxy:
    """Listeners keyed by (ClusterIP, port); :meth:`update` sets the whole desired state."""

    def __init__(
        self, add_address: Callable[[str], None], remove_address: Callable[[str], None]
    ) -> None:
        self._add_address = add_address
        self._remove_address = remove_address
        self._listeners: dict[Backend, _Listener] = {}

    async def update(self, desired: dict[Backend, list[Backend]]) -> None:
        for key in set(self._listeners) - set(desired):
            await self._close(key)
        for key, backends in desired.items():
            listener = self._listeners.get(key)
            if listener is None:
                listener = await self._open(key)
                if listener is None:
                    continue
            listener.backends = backends
        kept = {address for address, _ in desired}
        for address in {a for a, _ in self._listeners} - kept:
            self._remove_address(address)

    async def _open(self, key: Backend) -> _Listener | None:
        address, port = key
        self._add_address(address)
        holder: list[_Listener] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._forward(holder[0], reader, writer)

        try:
            server = await asyncio.start_server(handle, address, port, reuse_address=True)
        except OSError as error:
            log.warning("service proxy cannot listen on %s:%d: %s", address, port, error)
            return None
        listener = _Listener(server)
        holder.append(listener)
        self._listeners[key] = listener
        return listener

    async def _close(self, key: Backend) -> None:
        listener = self._listeners.pop(key)
        listener.server.close()
        with contextlib.suppress(Exception):
            await listener.server.wait_closed()

    async def close(self) -> None:
        for key in list(self._listeners):
            await self._close(key)
        for address in {a for a, _ in self._listeners}:
            self._remove_address(address)

    async def _forward(
        self, listener: _Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        upstream = await self._connect(listener)
        if upstream is None:
            writer.close()  # no ready endpoint: refuse, as kube-proxy's REJECT does
            return
        up_reader, up_writer = upstream
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for end in (writer, up_writer):
                with contextlib.suppress(Exception):
                    end.close()

    async def _connect(
        self, listener: _Listener
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        backends = list(listener.backends)
        if not backends:
            return None
        start = next(listener.counter)
        for offset in range(len(backends)):
            host, port = backends[(start + offset) % len(backends)]
            try:
                return await asyncio.wait_for(asyncio.open_connection(host, port), _CONNECT_TIMEOUT)
            except (OSError, TimeoutError):
                continue
        return None


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        # One side went away: close the other direction too.
        writer.close()
