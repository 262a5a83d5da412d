"""Server-sent events from the model server: read usage on the way, hide what the client did
not ask for. Pure functions over bytes; the relay feeds it chunks as they arrive.
"""

from __future__ import annotations

from inference_gateway.errors import error_body
from inference_gateway.metering.readers import Usage, openai_usage, read_id, usage_span

_DATA = b"data: "
_EMPTY_CHOICES = b'"choices":[]'
_FINISHED = b'"finish_reason":"'  # a non-null finish reason; cannot occur inside a string
DONE = b"data: [DONE]\n\n"


def take_events(buffer: bytes, chunk: bytes) -> tuple[bytes, bytes]:
    """The complete events in what has arrived so far, and the rest, kept for the next chunk."""
    data = buffer + chunk if buffer else chunk
    end = data.rfind(b"\n\n")
    if end == -1:
        return b"", data
    return data[: end + 2], data[end + 2 :]


class StreamFilter:
    """Splits an SSE byte stream into events and rewrites each one.

    The upstream was asked for ``include_usage`` and ``continuous_usage_stats`` so that every
    chunk carries the running token counts. What the client did not ask for is removed: the
    ``usage`` member of each chunk (unless it asked for continuous stats) and the final
    usage-only chunk (unless it asked for ``include_usage``). All other bytes pass unchanged.

    One more detail keeps the stream identical to what the client would get without usage:
    vLLM then puts the members that follow ``usage`` in the usage-only chunk (its
    ``system_fingerprint``) on every chunk that finishes a choice instead. Those members are
    the same for every answer of one server, so the caller passes in the ones it saw last
    (``trailer``) and they are added at once. Until they are known, events are held from the
    first finishing chunk until the usage chunk shows them (for one choice, that is the very
    next event); ``learned`` then holds them for the next stream.
    """

    __slots__ = ("_buffer", "_held", "_keep_continuous", "_keep_final", "done", "events",
                 "final", "learned", "trailer", "upstream_id", "usage")

    def __init__(self, keep_final_usage: bool, keep_continuous_usage: bool,
                 trailer: bytes | None = None) -> None:
        self._keep_final = keep_final_usage
        self._keep_continuous = keep_continuous_usage
        self._buffer = b""
        self._held: list[bytes] = []  # events waiting for the trailer, see the class docstring
        self.trailer = trailer
        self.learned: bytes | None = None
        self.usage: Usage | None = None
        self.final = False  # the usage-only chunk that closes the answer arrived
        self.upstream_id: str | None = None
        self.events = 0  # data events passed to the client
        self.done = False  # the closing [DONE] arrived; it is held back, see ``feed``

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to send to the client now: every complete event in what has arrived so far.

        A closing ``data: [DONE]`` is held back (``done`` is set instead) so that the caller
        can record the usage before the client learns that the stream is over.
        """
        complete, self._buffer = take_events(self._buffer, chunk)
        if not complete:
            return b""
        at = len(complete) - len(DONE)
        if complete.endswith(DONE) and (at == 0 or complete[at - 1] == 0x0A):
            complete = complete[: -len(DONE)]
            self.done = True
        if self._keep_final and self._keep_continuous:
            self._observe_all(complete)
            return complete
        out: list[bytes] = []
        for event in complete.split(b"\n\n")[:-1]:
            self._event(event, out)
        if self.done:
            self._release(out)
        return b"".join(out)

    def finish(self) -> bytes:
        """Whatever is left when the upstream closes (an unterminated last event)."""
        rest, self._buffer = self._buffer, b""
        out: list[bytes] = []
        if rest.strip():
            self._event(rest, out)
            if out and out[-1] == b"\n\n" and not rest.endswith(b"\n\n"):
                out.pop()
        self._release(out)
        return b"".join(out)

    def tail(self) -> bytes:
        """The held-back ``[DONE]``, to send once the usage is recorded."""
        return DONE if self.done else b""

    @staticmethod
    def relayed_text() -> str:
        return ""  # not needed: every chunk carries the running usage

    @staticmethod
    def error_event(message: str, code: str) -> bytes:
        """An in-band error, as vLLM sends one when generation fails mid-stream."""
        return b"data: " + error_body(502, message, code=code) + b"\n\n" + DONE

    def _observe_all(self, complete: bytes) -> None:
        for event in complete.split(b"\n\n")[:-1]:
            if event.startswith(_DATA):
                self.events += 1
                self._read_usage(event)

    def _read_usage(self, event: bytes) -> tuple[int, int] | None:
        if self.upstream_id is None and event.startswith(_DATA):
            self.upstream_id = read_id(event[len(_DATA):])
        if b'"usage"' not in event:
            return None
        span = usage_span(event)
        if span is None:
            return None
        start, end, value = span
        usage = openai_usage(value)
        if usage is not None:
            self.usage = usage
            if _EMPTY_CHOICES in event:
                self.final = True
        return start, end

    def _release(self, out: list[bytes]) -> None:
        """Send the held events, the finishing ones with the trailer (when it is known)."""
        held, self._held = self._held, []
        for event in held:
            out.append(self._with_trailer(event) if _FINISHED in event else event)
            out.append(b"\n\n")

    def _with_trailer(self, event: bytes) -> bytes:
        if self.trailer and event.endswith(b"}"):
            return event[:-1] + self.trailer + b"}"
        return event

    def _event(self, event: bytes, out: list[bytes]) -> None:
        if event.startswith(_DATA) and event[6:7] == b"{":
            span = self._read_usage(event)
            if span is not None and _EMPTY_CHOICES in event:
                if not self._keep_final:
                    # The usage-only chunk the client did not ask for: drop it, and give what
                    # followed its usage to the chunks that finished a choice.
                    self.learned = self.trailer = _members_after(event, span[1])
                    self._release(out)
                    return
            elif span is not None and not self._keep_continuous:
                event = _cut(event, *span)
            if not self._keep_final and _FINISHED in event:
                if self.trailer is None or self._held:
                    self._held.append(event)
                    self.events += 1
                    return
                event = self._with_trailer(event)
        if self._held:
            self._held.append(event)
        else:
            out.append(event)
            out.append(b"\n\n")
        if event.startswith(_DATA):
            self.events += 1


def _members_after(event: bytes, end: int) -> bytes:
    """The object members after position ``end`` (a member's end), with their leading comma."""
    tail = event[end:].rstrip()
    if tail.endswith(b"}"):
        tail = tail[:-1]
    return tail if tail.lstrip().startswith(b",") else b""


def _cut(event: bytes, start: int, end: int) -> bytes:
    """Remove ``"usage": {...}`` at [start, end) together with the comma that joined it."""
    i = start - 1
    while i >= 0 and event[i] in b" \t\r\n":
        i -= 1
    if i >= 0 and event[i] == 0x2C:  # ','
        return event[:i] + event[end:]
    j = end
    while j < len(event) and event[j] in b" \t\r\n":
        j += 1
    if j < len(event) and event[j] == 0x2C:
        return event[:start] + event[j + 1 :]
    return event[:start] + event[end:]
