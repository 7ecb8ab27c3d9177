"""Where a webhook may be sent: http(s) URLs whose host resolves to public addresses only.

A webhook makes the service's own network send requests to a URL a tenant chose; without this
guard a tenant could reach the metadata service, the database or an internal admin page
(server-side request forgery). Checked when an endpoint is registered or changed and again
before every attempt (DNS answers change).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from app.settings import Settings


class TargetRefused(ValueError):
    """The URL is not one the service sends webhooks to; the message says why."""


def check_url(url: str, settings: Settings) -> None:
    """Raise TargetRefused unless `url` is http(s) with a host whose every address is allowed."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise TargetRefused(f"not a valid URL: {error}") from error
    if parts.scheme not in ("http", "https"):
        raise TargetRefused(
            f"the scheme must be http or https, not {parts.scheme or 'none'!r}"
        )
    host = parts.hostname
    if not host:
        raise TargetRefused("the URL names no host")
    if parts.username or parts.password:
        raise TargetRefused("credentials in the URL are not allowed; use the signature instead")
    for address in _addresses(host, port or (443 if parts.scheme == "https" else 80)):
        reason = _refusal(address, settings)
        if reason:
            raise TargetRefused(f"{host} resolves to {address}, {reason}")


def _addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise TargetRefused(f"the host {host} does not resolve ({error})") from error
    found = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        found.append(address)
    return found


def _refusal(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, settings: Settings
) -> str | None:
    """Why `address` is refused, or None."""
    if address.is_loopback:
        if settings.webhook_allow_loopback:
            return None
        return "a loopback address (allowed only with TAILOR_WEBHOOK_ALLOW_LOOPBACK)"
    # Link-local holds the cloud metadata service (169.254.169.254): never allowed.
    if address.is_link_local or address.is_multicast or address.is_unspecified:
        return "a link-local, multicast or unspecified address"
    if address.is_global:
        return None
    if settings.webhook_allow_private_networks and address.is_private:
        return None
    return ("a private or reserved address (allowed only with "
            "TAILOR_WEBHOOK_ALLOW_PRIVATE_NETWORKS)")
