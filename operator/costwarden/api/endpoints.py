"""Where a RoutingPolicy may send calls: the endpoint rules and the admin's provider hosts.

An endpoint is a base URL the gateway appends an API path to and POSTs prompts (with a
provider key) to, so a tenant who writes one chooses where the gateway connects. The rules
below close the ways that goes wrong, each written once as CEL (the API server refuses
the object) with a Python twin (``costwarden validate`` and the operator):

- every endpoint: an absolute http(s) URL whose authority is a plain host (DNS name or IP
  literal) and optional port: no userinfo (``user:pass@``), no query, no fragment (either
  would replace the path the gateway appends), no percent-escapes, backslashes or spaces
  in the host (parsers disagree about them), no IP address in a decimal, octal or hex
  spelling (``http://2852039166`` is 169.254.169.254 to libc); and never a link-local,
  unspecified or cloud-metadata address, whatever the model's locality (a tenant chooses
  the locality, so it is no boundary).
- External models (outside the cluster by definition): no loopback, no in-cluster or
  private names (single-label names, ``.svc``, ``.cluster.local``, ``.local``,
  ``.internal``, ``.localhost``), no private, shared or NAT64 IP ranges; and ``https`` when
  the model carries credentials, so the key is never sent in clear.

The Python side mirrors the CEL libraries of Kubernetes 1.34 (``url()``/``getHostname()``
of the URL library, ``isIP``/``ip()`` of the IP library, ``cidr().containsIP``): a host
is an IP only when the IP library says so (no zones, no IPv4-mapped IPv6, no leading
zeros), and names are compared lower-cased, a trailing dot ignored.

What the schema cannot know is the admin's list of provider hosts
(:class:`ProviderHosts`, chart value ``providerHosts.allowed``): an External endpoint
outside it makes the policy Ready=False, and the gateway refuses to connect to it.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from costwarden.api.rules import CelRule

# --- the pieces of CEL the rules share ----------------------------------------------------


def _host_of(url: str) -> str:
    """CEL for the lower-cased host of a plain URL (no port, no brackets).

    Written with ``find`` and ``substring`` rather than ``url(...).getHostname()``: the URL
    library's accessors carry no size estimate, so the API server prices any string
    function on their result as if it were megabytes long and refuses the CRD. ``find``
    results are bounded by the endpoint's maxLength.
    """
    authority = f"{url}.find('//[^/]*').substring(2)"
    return (
        f"({authority}.startsWith('[') ? {authority}.find('[^\\\\[\\\\]]+') : "
        f"{authority}.find('^[^:]*')).lowerAscii()"
    )


_HOST = _host_of("self")
_MODEL_HOST = _host_of("self.endpoint")
_EXTERNAL = "(!has(self.locality) || self.locality == 'External')"

# An authority of letters, digits, dots and hyphens, or a bracketed IPv6 literal, and a
# port; then a path of RFC 3986 path characters only.
PLAIN_URL_PATTERN = (
    r"^[A-Za-z][A-Za-z0-9+.-]*://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?"
    r"(/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*)?$"
)
# A last label that is a number (decimal, octal) or hex: an IPv4 address in disguise.
NUMERIC_HOST_PATTERN = r"(^|\.)(0[xX][0-9A-Fa-f]*|[0-9]+)\.?$"
METADATA_NAME_PATTERN = (
    r"^(metadata|metadata\.google\.internal|metadata\.goog|instance-data"
    r"|instance-data\.ec2\.internal)\.?$"
)
LOOPBACK_NAME_PATTERN = r"(^|\.)localhost\.?$"
CLUSTER_NAME_PATTERN = r"(^[^.]+\.?$)|(\.(svc|cluster\.local|local|internal|localhost)\.?$)"

# Never a model endpoint, whatever its locality: link-local (cloud metadata at
# 169.254.169.254, fd00:ec2::254 on AWS IPv6, 100.100.100.200 on Alibaba), "this network".
FORBIDDEN_CIDRS = ("0.0.0.0/8", "100.100.100.200/32", "fd00:ec2::254/128")
# Not outside the cluster: RFC 1918, shared address space (CGNAT), unique local IPv6, the
# NAT64 prefix (it embeds any IPv4 address, private ones included), benchmarking.
PRIVATE_CIDRS = (
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "198.18.0.0/15",
    "fc00::/7",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
)


def _any_cidr(cidrs: Iterable[str], host: str) -> str:
    return " || ".join(f"cidr('{c}').containsIP({host})" for c in cidrs)


# --- the Python side of the CEL libraries ----------------------------------------------------


def url_hostname(value: str) -> str:
    """The host of a URL without port or brackets, lower-cased, found exactly as the CEL
    rules find it (:func:`_host_of`): after the first ``//``, up to ``/``, then up to ``:``
    (or inside ``[...]``)."""
    _, sep, rest = value.partition("//")
    if not sep:
        return ""
    authority = rest.split("/", 1)[0]
    if authority.startswith("["):
        match = re.search(r"[^\[\]]+", authority)
        return match.group(0).lower() if match else ""
    return authority.split(":", 1)[0].lower()


def ip_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address when ``isIP(host)`` holds in the Kubernetes IP library, else None."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and (
        address.scope_id is not None or address.ipv4_mapped is not None
    ):
        return None
    return address


def _in(address: ipaddress.IPv4Address | ipaddress.IPv6Address, cidrs: Iterable[str]) -> bool:
    return any(address in ipaddress.ip_network(c) for c in cidrs)


def _link_local_multicast(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv4Address):
        return address in ipaddress.ip_network("224.0.0.0/24")
    return (int(address) >> 112) & 0xFF0F == 0xFF02


def _global_unicast(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """netip.Addr.IsGlobalUnicast: private ranges count as global, as in Go."""
    if address == ipaddress.IPv4Address("255.255.255.255"):
        return False
    return not (
        address.is_unspecified
        or address.is_loopback
        or address.is_multicast
        or _link_local(address)
    )


def _link_local(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    net = "169.254.0.0/16" if isinstance(address, ipaddress.IPv4Address) else "fe80::/10"
    return address in ipaddress.ip_network(net)


def _is_url(value: str) -> bool:
    """The guard of the host rules: only a plain URL has a host they can judge (any other
    endpoint is refused by the plain-URL rule already)."""
    return is_plain_url(value)


# --- the predicates (Python twins) --------------------------------------------------------


def is_http_url(value: str) -> bool:
    try:
        parsed = urlsplit(value)
        return parsed.scheme in ("http", "https") and bool(parsed.hostname)
    except ValueError:
        return False


def has_no_userinfo(value: str) -> bool:
    return re.search(r"^[^:/]+://[^/]*@", value) is None


def is_plain_url(value: str) -> bool:
    return re.fullmatch(PLAIN_URL_PATTERN, value) is not None


def host_is_not_disguised_ip(value: str) -> bool:
    if not _is_url(value):
        return True
    host = url_hostname(value)
    return ip_of(host) is not None or (
        ":" not in host and re.search(NUMERIC_HOST_PATTERN, host) is None
    )


def host_is_not_metadata(value: str) -> bool:
    if not _is_url(value):
        return True
    host = url_hostname(value)
    address = ip_of(host)
    if address is not None:
        return not (
            _link_local(address)
            or _link_local_multicast(address)
            or address.is_unspecified
            or _in(address, FORBIDDEN_CIDRS)
        )
    return re.search(METADATA_NAME_PATTERN, host) is None


def external_host_is_not_loopback(host: str) -> bool:
    address = ip_of(host)
    if address is not None:
        return not address.is_loopback
    return re.search(LOOPBACK_NAME_PATTERN, host) is None


def external_host_is_not_cluster_name(host: str) -> bool:
    return ip_of(host) is not None or re.search(CLUSTER_NAME_PATTERN, host) is None


def external_host_is_public(host: str) -> bool:
    address = ip_of(host)
    return address is None or (_global_unicast(address) and not _in(address, PRIVATE_CIDRS))


# --- the rules ----------------------------------------------------------------------------

ENDPOINT_RULES: tuple[CelRule, ...] = (
    CelRule(
        cel=(
            "isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHost() != ''"
        ),
        message="must be an absolute http or https URL",
        holds=is_http_url,
    ),
    CelRule(
        cel="!self.matches('^[^:/]+://[^/]*@')",
        message=(
            "must not contain userinfo (user:password@host); a provider key belongs in "
            "credentials, a Secret reference"
        ),
        holds=has_no_userinfo,
    ),
    CelRule(
        cel="!self.contains('?')",
        message=(
            "must not contain a query (?...): the gateway appends the API path to the "
            "endpoint and a query would replace it"
        ),
        holds=lambda v: "?" not in v,
    ),
    CelRule(
        cel="!self.contains('#')",
        message=(
            "must not contain a fragment (#...): the gateway appends the API path to the "
            "endpoint and a fragment would swallow it"
        ),
        holds=lambda v: "#" not in v,
    ),
    CelRule(
        cel=f"self.matches({PLAIN_URL_PATTERN!r})",
        message=(
            "must be scheme://host[:port][/path] with a host of letters, digits, '.' and '-' "
            "or a [IPv6] literal, and a path of URL characters only (no spaces, backslashes)"
        ),
        holds=is_plain_url,
    ),
    CelRule(
        cel=(
            f"!self.matches({PLAIN_URL_PATTERN!r}) || isIP({_HOST}) || "
            f"(!{_HOST}.contains(':') && !{_HOST}.matches({NUMERIC_HOST_PATTERN!r}))"
        ),
        message=(
            "host must be a DNS name or an IP address in standard notation: a decimal, "
            "octal or hex spelling (e.g. 2852039166, 0xA9FEA9FE) or an IPv4-mapped IPv6 "
            "address hides where the gateway connects"
        ),
        holds=host_is_not_disguised_ip,
    ),
    CelRule(
        cel=(
            f"!self.matches({PLAIN_URL_PATTERN!r}) || "
            f"(isIP({_HOST}) ? !(ip({_HOST}).isLinkLocalUnicast() || "
            f"ip({_HOST}).isLinkLocalMulticast() || ip({_HOST}).isUnspecified() || "
            f"{_any_cidr(FORBIDDEN_CIDRS, _HOST)}) : "
            f"!{_HOST}.matches({METADATA_NAME_PATTERN!r}))"
        ),
        message=(
            "must not be a link-local, unspecified or cloud metadata address "
            "(169.254.0.0/16, fe80::/10, 0.0.0.0/8, 169.254.169.254, "
            "metadata.google.internal): no model is served there"
        ),
        holds=host_is_not_metadata,
    ),
)


def _model_rule(cel: str, message: str, holds: Any) -> CelRule:
    return CelRule(
        cel=f"!{_EXTERNAL} || !self.endpoint.matches({PLAIN_URL_PATTERN!r}) || {cel}",
        message=message,
        holds=holds,
        field_path=".endpoint",
        reason="FieldValueForbidden",
    )


def _external(model: Any) -> bool:
    return str(getattr(model.locality, "value", model.locality)) == "External"


def _external_host(model: Any) -> str | None:
    """The endpoint's host when the model is External and its endpoint a URL."""
    if not _external(model) or not _is_url(model.endpoint):
        return None
    return url_hostname(model.endpoint)


MODEL_ENDPOINT_RULES: tuple[CelRule, ...] = (
    _model_rule(
        f"!((isIP({_MODEL_HOST}) && ip({_MODEL_HOST}).isLoopback()) || "
        f"{_MODEL_HOST}.matches({LOOPBACK_NAME_PATTERN!r}))",
        "an External model's endpoint must not be a loopback address (127.0.0.0/8, ::1, "
        "localhost); a model served inside the cluster is locality: InCluster",
        lambda m: (h := _external_host(m)) is None or external_host_is_not_loopback(h),
    ),
    _model_rule(
        f"isIP({_MODEL_HOST}) || !{_MODEL_HOST}.matches({CLUSTER_NAME_PATTERN!r})",
        "an External model's endpoint must be a public DNS name, not an in-cluster or "
        "private one (single-label, .svc, .cluster.local, .local, .internal, .localhost); "
        "a model served inside the cluster is locality: InCluster",
        lambda m: (h := _external_host(m)) is None or external_host_is_not_cluster_name(h),
    ),
    _model_rule(
        f"!isIP({_MODEL_HOST}) || (ip({_MODEL_HOST}).isGlobalUnicast() && "
        f"!({_any_cidr(PRIVATE_CIDRS, _MODEL_HOST)}))",
        "an External model's endpoint must not be a private, shared or non-unicast address "
        "(10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7, 64:ff9b::/96, ...); a model "
        "served inside the cluster is locality: InCluster",
        lambda m: (h := _external_host(m)) is None or external_host_is_public(h),
    ),
    _model_rule(
        "!has(self.credentials) || self.endpoint.lowerAscii().startsWith('https://')",
        "an External model with credentials must use an https endpoint: its provider key "
        "would cross the network in clear",
        lambda m: (
            _external_host(m) is None
            or m.credentials is None
            or m.endpoint.lower().startswith("https://")
        ),
    ),
)


# --- the admin's provider hosts ----------------------------------------------------------------

HOST_PATTERN_RE = re.compile(
    r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)


@dataclass(frozen=True)
class ProviderHosts:
    """The provider hosts an admin allows External models to use; empty allows all.

    Entries are exact hosts (``api.openai.com``) or ``*.suffix`` (``*.openai.azure.com``:
    any name ending in ``.openai.azure.com``, not the bare suffix). Matching ignores case
    and a trailing dot; ports and schemes are not part of an entry.
    """

    allowed: tuple[str, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> ProviderHosts:
        cleaned = []
        for entry in entries:
            for part in entry.split(","):
                host = part.strip().lower().rstrip(".")
                if not host:
                    continue
                if not HOST_PATTERN_RE.match(host):
                    raise ValueError(
                        f"provider host {part.strip()!r} is neither a host name nor *.suffix"
                    )
                cleaned.append(host)
        return cls(tuple(sorted(set(cleaned))))

    @property
    def restricted(self) -> bool:
        return bool(self.allowed)

    def allows_host(self, host: str) -> bool:
        if not self.allowed:
            return True
        host = host.lower().rstrip(".")
        for entry in self.allowed:
            if entry.startswith("*."):
                if host.endswith(entry[1:]) and len(host) > len(entry) - 1:
                    return True
            elif host == entry:
                return True
        return False

    def allows_url(self, url: str) -> bool:
        return self.allows_host(url_hostname(url))

    def describe(self) -> str:
        return ", ".join(self.allowed) if self.allowed else "any host"


def provider_host_argument(value: str) -> str:
    """argparse ``type`` of ``--allowed-provider-host``: refuses what is not a host entry."""
    try:
        ProviderHosts.parse([value])
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return value


ANY_HOST = ProviderHosts()
"""No allow-list: any host the endpoint rules accept."""


__all__ = [
    "ANY_HOST",
    "ENDPOINT_RULES",
    "MODEL_ENDPOINT_RULES",
    "ProviderHosts",
    "ip_of",
    "url_hostname",
]
