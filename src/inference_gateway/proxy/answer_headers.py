"""The header names a model server sends, each worked out once: a server sends the same few on
every answer, and the client reads them on every request."""

from __future__ import annotations

from multidict import istr

# Answer headers that describe one hop's connection, not the answer itself: never relayed.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding",
    "date", "server", "proxy-authenticate", "trailer", "upgrade",
})
MAX_NAMES = 256  # names kept; a server that sends more has the rest worked out each time

_NAMES: dict[bytes, tuple[str, str, bool]] = {}


def header_name(raw: bytes) -> tuple[str, str, bool]:
    """A name as read → as ``istr`` (which aiohttp's header map takes without working out its
    case), in lower case, and whether it is relayed to the client."""
    known = _NAMES.get(raw)
    if known is None:
        name = istr(raw.decode("latin-1"))
        lower = name.lower()
        known = name, lower, lower not in HOP_BY_HOP
        if len(_NAMES) < MAX_NAMES:
            _NAMES[raw] = known
    return known
