"""Credentials in URLs never leave memory: the recorded and printed form of a URL, and a scrub for
any text that may carry one (errors from fsspec, botocore or aiohttp quote the URL they failed on).

Redacted: the userinfo (``http://user:password@host`` -> ``http://REDACTED@host``) and the values of
query parameters that sign or authorise a request - AWS (``X-Amz-*``), Google (``X-Goog-*``), Azure
SAS (``sig``, ``se``, ``st``, ``sp``, ``sv``, ``sr``, ``ss``, ``srt``, ``spr``, ``sip``, ``si``, ``skoid``,
``sktid``, ``skt``, ``ske``, ``sks``, ``skv``, ``sdd``) and generic ones (``token``, ``access_token``,
``signature``, ``key``, ``apikey``, ``password``, ``credential``, ``policy``, ``Expires``,
``Key-Pair-Id``, S3's SigV2 ``AWSAccessKeyId``). The parameter names stay, with the value ``REDACTED``: a URL re-signed for the
same object has the same redacted form, so a refreshed URL is not "a changed input" (the object's
identity is its size and ETag).
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit, urlunsplit

__all__ = ["REDACTED", "redact_text", "redact_url", "secret_param"]

REDACTED = "REDACTED"

_AZURE_SAS = {"sig", "se", "st", "sp", "sv", "sr", "ss", "srt", "spr", "sip", "si", "skoid", "sktid", "skt", "ske",
              "sks", "skv", "sdd"}
_GENERIC = {"token", "access_token", "id_token", "signature", "key", "apikey", "api_key", "password", "passwd",
            "credential", "credentials", "policy", "expires", "key-pair-id", "x-api-key", "auth", "awsaccesskeyid"}


def secret_param(name: str) -> bool:
    """Whether a query parameter of this name signs or authorises a request."""
    low = name.lower()
    return low.startswith(("x-amz-", "x-goog-")) or low in _AZURE_SAS or low in _GENERIC


def redact_url(url: str) -> str:
    """``url`` with its userinfo and secret query values replaced by ``REDACTED`` (anything else,
    local paths included, unchanged)."""
    s = str(url)
    if "://" not in s:
        return s
    parts = urlsplit(s)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    if not parts.query:
        return urlunsplit(parts._replace(netloc=netloc))
    segments = parts.query.split("&")
    names = [unquote(seg.split("=", 1)[0]) for seg in segments]
    if not any(secret_param(n) for n in names):
        return urlunsplit(parts._replace(netloc=netloc))
    query = "&".join(f"{seg.split('=', 1)[0]}={REDACTED}" if secret_param(n) else seg for seg, n in zip(segments, names))
    return urlunsplit(parts._replace(netloc=netloc, query=query))


_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"]+@")
_PARAM = re.compile(r"(?P<sep>[?&;])(?P<name>[A-Za-z0-9_.\-]+)=(?P<value>[^&\s'\"#<>]*)")


def redact_text(text: str) -> str:
    """Any text with the userinfo of URLs and the values of secret query parameters redacted (for
    error messages and logs that quote a URL, possibly percent-encoded or cut)."""
    if not text:
        return text
    out = _USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", str(text))
    return _PARAM.sub(lambda m: f"{m.group('sep')}{m.group('name')}={REDACTED}" if secret_param(m.group("name"))
                      else m.group(0), out)
