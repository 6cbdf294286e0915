"""API keys: loaded from an environment variable or a file, kept only as SHA-256 digests,
compared in constant time, never logged."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HASHED = re.compile(r"^sha256:([0-9a-f]{64})$")
MIN_KEY_LENGTH = 16


class ApiKeyConfigError(ValueError):
    """The key list is malformed; the message says which entry and why (never the key)."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def parse_key_entries(text: str, source: str) -> dict[str, bytes]:
    """Parses ``name:key`` or ``name:sha256:<hex digest>`` entries, one per line or
    separated by commas; blank lines and lines starting with ``#`` are ignored.

    A ``#`` inside an entry belongs to the key (it used to start a comment, silently
    cutting such a key short); a key cannot hold a comma or whitespace, and an entry
    with whitespace in its key is refused (a comment after an entry, say), never cut.
    """
    digests: dict[str, bytes] = {}
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    entries = [e.strip() for line in lines for e in line.split(",")]
    for position, entry in enumerate(filter(None, entries), start=1):
        name, separator, secret = entry.partition(":")
        if not separator or not _NAME.match(name):
            raise ApiKeyConfigError(
                f"{source}: entry {position} must be `name:key` or `name:sha256:<hex>` "
                "with a name of letters, digits, `.`, `_` or `-`"
            )
        if name in digests:
            raise ApiKeyConfigError(f"{source}: key name {name!r} appears twice")
        if any(character.isspace() for character in secret):
            raise ApiKeyConfigError(
                f"{source}: key {name!r} contains whitespace; keys cannot, and a comment "
                "goes on a line of its own starting with #"
            )
        hashed = _HASHED.match(secret)
        if hashed:
            digests[name] = bytes.fromhex(hashed.group(1))
        elif len(secret) < MIN_KEY_LENGTH:
            raise ApiKeyConfigError(
                f"{source}: key {name!r} is shorter than {MIN_KEY_LENGTH} characters"
            )
        else:
            digests[name] = _digest(secret)
    return digests


class ApiKeys:
    """Named API keys, held as digests."""

    def __init__(self, digests: Mapping[str, bytes]) -> None:
        self._entries = list(digests.items())

    @classmethod
    def load(cls, env_value: str | None, files: Iterable[Path]) -> "ApiKeys":
        """Reads keys from ``TEXTGEN_API_KEYS``'s value and from key files.

        Raises:
            ApiKeyConfigError: a malformed entry, a missing file, or a name in two places.
        """
        digests: dict[str, bytes] = {}
        sources = [("TEXTGEN_API_KEYS", env_value)] if env_value else []
        for path in files:
            try:
                sources.append((str(path), Path(path).read_text()))
            except OSError as exc:
                raise ApiKeyConfigError(f"cannot read API key file {path}: {exc.strerror}") from exc
        for source, text in sources:
            for name, digest in parse_key_entries(text, source).items():
                if name in digests:
                    raise ApiKeyConfigError(f"key name {name!r} is defined twice ({source})")
                digests[name] = digest
        return cls(digests)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._entries]

    def identify(self, presented: str) -> str | None:
        """The name of the key ``presented`` matches, or None.

        Every entry is compared, each in constant time, so the answer's timing does not
        tell how close a guess came or which entry it hit.
        """
        digest = _digest(presented)
        found = None
        for name, expected in self._entries:
            if hmac.compare_digest(digest, expected):
                found = name
        return found

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._entries)} keys)"


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a client sent: ``Authorization: Bearer <key>`` (the OpenAI clients' way)
    or ``X-API-Key: <key>``."""
    authorization = headers.get("authorization", "")
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return headers.get("x-api-key") or None
