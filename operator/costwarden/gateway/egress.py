"""How the gateway reaches its upstreams: forward proxies and the CAs it trusts.

One decision for every upstream client (``http1``, ``aiohttp``, ``httpx``), following the
conventions ``curl`` and httpx share:

- ``https_proxy`` / ``HTTPS_PROXY`` for ``https://`` upstreams (CONNECT tunnel, TLS end
  to end), ``http_proxy`` / ``HTTP_PROXY`` for ``http://`` ones (absolute-form requests),
  ``all_proxy`` / ``ALL_PROXY`` for both when the specific one is unset; the lower-case
  name wins when both are set. A proxy URL without a scheme means ``http://``; its
  userinfo (``http://user:pass@proxy:3128``, percent-encoded) becomes
  ``Proxy-Authorization: Basic ...``. Only ``http://`` proxies are supported: an
  ``https://`` or ``socks`` proxy URL is refused at startup, never silently bypassed.
- ``no_proxy`` / ``NO_PROXY``: comma- or space-separated; ``*`` bypasses the proxy for
  every host; ``example.com`` matches it and its subdomains (a leading ``.`` or ``*.``
  changes nothing, as in curl); ``host:port`` only that port; IP addresses match exactly
  and CIDR blocks (``10.0.0.0/8``, ``fd00::/8``) match every address inside (the
  upstream's address as written in its URL: names are not resolved to decide).
- Trust: the system CAs (OpenSSL honours ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``), plus the
  PEM bundle given by ``--upstream-ca-file`` (``COSTWARDEN_UPSTREAM_CA_FILE``), e.g. the
  CA of a TLS-inspecting proxy or of an in-cluster model server. Hostnames are always
  checked.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from urllib.parse import unquote, urlsplit

CA_FILE_ENV = "COSTWARDEN_UPSTREAM_CA_FILE"
_IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Proxy:
    """A forward proxy: where to connect and what to authenticate with."""

    host: str
    port: int
    username: str = ""
    password: str = ""

    @property
    def url(self) -> str:
        """The proxy's URL without credentials (safe to log and show)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def authorization(self) -> str | None:
        """The ``Proxy-Authorization`` value, or None without userinfo."""
        if not self.username and not self.password:
            return None
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode("ascii")
        return f"Basic {token}"


def parse_proxy(value: str) -> Proxy:
    """A proxy URL as curl reads it (``proxy:3128`` means ``http://proxy:3128``)."""
    text = value.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme.lower() != "http":
        raise ValueError(
            f"proxy {parts.scheme}://{parts.hostname}: only http:// forward proxies are "
            "supported (https upstreams still go through them end-to-end encrypted, via CONNECT)"
        )
    if not parts.hostname:
        raise ValueError(f"proxy URL {value!r} has no host")
    return Proxy(
        host=parts.hostname,
        port=parts.port or 80,
        username=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
    )


@dataclass(frozen=True)
class _Bypass:
    everything: bool
    names: tuple[tuple[str, int | None], ...]  # (domain without leading dots, port)
    addresses: tuple[tuple[_IPNetwork, int | None], ...]

    @classmethod
    def parse(cls, value: str) -> _Bypass:
        names: list[tuple[str, int | None]] = []
        addresses: list[tuple[_IPNetwork, int | None]] = []
        everything = False
        for raw in value.replace(",", " ").split():
            entry = raw.strip().lower()
            if entry == "*":
                everything = True
                continue
            host, port = _split_port(entry)
            try:
                addresses.append((ipaddress.ip_network(host, strict=False), port))
                continue
            except ValueError:
                pass
            domain = host.removeprefix("*").lstrip(".").rstrip(".")
            if domain:
                names.append((domain, port))
        return cls(everything, tuple(names), tuple(addresses))

    def matches(self, host: str, port: int) -> bool:
        if self.everything:
            return True
        host = host.lower().strip("[]").rstrip(".")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return any(
                (host == domain or host.endswith("." + domain)) and want in (None, port)
                for domain, want in self.names
            )
        return any(
            address.version == network.version and address in network and want in (None, port)
            for network, want in self.addresses
        )


def _split_port(entry: str) -> tuple[str, int | None]:
    """``host:port``, ``[v6]:port``, ``v6`` (bare, several colons) or ``host``."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if entry.count(":") == 1:
        host, _, port = entry.partition(":")
        if port.isdigit():
            return host, int(port)
    return entry, None


def _env(env: Mapping[str, str], name: str) -> str:
    """The lower-case variable first, as curl and Python's urllib read them."""
    return env.get(name.lower()) or env.get(name.upper()) or ""


class Egress:
    """Proxy choice per upstream and the TLS context, fixed at startup."""

    def __init__(
        self,
        *,
        http_proxy: Proxy | None = None,
        https_proxy: Proxy | None = None,
        no_proxy: str = "",
        ca_file: Path | None = None,
    ) -> None:
        self.http_proxy = http_proxy
        self.https_proxy = https_proxy
        self._bypass = _Bypass.parse(no_proxy)
        self.ca_file = ca_file
        if ca_file is not None and not ca_file.is_file():
            raise ValueError(f"upstream CA file {ca_file} does not exist")

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, ca_file: Path | None = None
    ) -> Egress:
        env = os.environ if env is None else env
        fallback = _env(env, "all_proxy")
        http_value = _env(env, "http_proxy") or fallback
        https_value = _env(env, "https_proxy") or fallback
        if ca_file is None and env.get(CA_FILE_ENV):
            ca_file = Path(env[CA_FILE_ENV])
        return cls(
            http_proxy=parse_proxy(http_value) if http_value else None,
            https_proxy=parse_proxy(https_value) if https_value else None,
            no_proxy=_env(env, "no_proxy"),
            ca_file=ca_file,
        )

    def proxy_for(self, scheme: str, host: str, port: int) -> Proxy | None:
        """The proxy to reach ``scheme://host:port`` through, or None to connect directly."""
        proxy = self.https_proxy if scheme == "https" else self.http_proxy
        if proxy is None or self._bypass.matches(host, port):
            return None
        return proxy

    def proxy_for_url(self, url: str) -> Proxy | None:
        parts = urlsplit(url)
        secure = parts.scheme == "https"
        return self.proxy_for(
            parts.scheme, parts.hostname or "", parts.port or (443 if secure else 80)
        )

    @cached_property
    def ssl_context(self) -> ssl.SSLContext:
        """System CAs (``SSL_CERT_FILE`` honoured) plus ``ca_file``; hostnames checked."""
        context = ssl.create_default_context()
        if self.ca_file is not None:
            context.load_verify_locations(cafile=str(self.ca_file))
        return context

    def describe(self) -> str:
        """One line for the startup log (no credentials)."""
        http = self.http_proxy.url if self.http_proxy else "direct"
        https = self.https_proxy.url if self.https_proxy else "direct"
        extra = f", extra CA {self.ca_file}" if self.ca_file else ""
        return f"upstream egress: http via {http}, https via {https}{extra}"


def describe_error(exc: BaseException, host: str, port: int) -> str:
    """Why an upstream could not be reached, for the caller's error message and the logs."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate of {host}:{port} rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake with {host}:{port} failed: {exc.reason or exc}"
    if isinstance(exc, TimeoutError):
        return f"no connection to {host}:{port} within the connect timeout"
    if isinstance(exc, OSError):
        return f"cannot connect to {host}:{port}: {exc.strerror or exc}"
    return f"{host}:{port}: {type(exc).__name__}: {exc}"
