"""Named-event streams (Responses, Messages): relayed byte for byte, usage read on the way."""

from __future__ import annotations

import json

import pytest

from inference_gateway.metering.readers import Usage
from inference_gateway.proxy.event_streams import EventStream
from inference_gateway.proxy.tokenize import relayed_tokens


def _event(kind: str, data: dict[str, object]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def responses_stream(deltas: list[str], end: str = "response.completed") -> list[bytes]:
    head = {"id": "resp_b6c3", "object": "response", "status": "in_progress", "usage": None}
    usage = {"input_tokens": 21, "input_tokens_details": {"cached_tokens": 16,
             "cache_write_tokens": 0}, "output_tokens": 5,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 26}
    events = [_event("response.created", {"response": head, "sequence_number": 0,
                                          "type": "response.created"}),
              _event("response.in_progress", {"response": head, "sequence_number": 1,
                                              "type": "response.in_progress"})]
    events += [_event("response.output_text.delta", {"content_index": 0, "delta": d,
                                                     "type": "response.output_text.delta"})
               for d in deltas]
    events.append(_event(end, {"response": {**head, "status": "completed", "usage": usage},
                               "sequence_number": 9, "type": end}))
    return events


def messages_stream(deltas: list[str]) -> list[bytes]:
    events = [_event("message_start", {"type": "message_start", "message": {
        "id": "chatcmpl-92bd", "type": "message", "usage": {"input_tokens": 358,
                                                            "output_tokens": 0}}}),
              _event("content_block_start", {"type": "content_block_start",
                                             "content_block": {"type": "text", "text": ""}})]
    events += [_event("content_block_delta", {"type": "content_block_delta",
                                              "delta": {"type": "text_delta", "text": d}})
               for d in deltas]
    events += [_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
               _event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "x"},
                                        "usage": {"input_tokens": 102, "output_tokens": 5,
                                                  "cache_creation_input_tokens": 0,
                                                  "cache_read_input_tokens": 256}}),
               _event("message_stop", {"type": "message_stop"})]
    return events


def relay(reader: EventStream, stream: bytes, size: int) -> tuple[bytes, bytes]:
    """Feed ``stream`` in pieces of ``size``; what is sent before and after the record."""
    sent = b"".join(reader.feed(stream[i:i + size]) for i in range(0, len(stream), size))
    return sent + reader.finish(), reader.tail()


@pytest.mark.parametrize("size", [1, 7, 100, 10_000])
def test_responses_stream(size: int) -> None:
    stream = b"".join(responses_stream(["z", " Fr\tHow", "Hel"]))
    reader = EventStream("responses")
    before, after = relay(reader, stream, size)
    assert before + after == stream  # nothing changed
    assert after.startswith(b"event: response.completed\n")  # held until recorded
    assert reader.usage == Usage(21, 5, 16) and reader.final
    assert reader.upstream_id == "resp_b6c3"
    assert reader.relayed_text() == "z Fr\tHowHel" and reader.deltas == 3


@pytest.mark.parametrize("end", ["response.incomplete", "response.failed"])
def test_responses_stream_other_ends(end: str) -> None:
    reader = EventStream("responses")
    _, after = relay(reader, b"".join(responses_stream(["a"], end)), 64)
    assert reader.final and after.startswith(f"event: {end}\n".encode())


@pytest.mark.parametrize("size", [1, 50, 10_000])
def test_messages_stream(size: int) -> None:
    stream = b"".join(messages_stream(["ck", " an", "ence", " d", "st"]))
    reader = EventStream("anthropic")
    before, after = relay(reader, stream, size)
    assert before + after == stream
    assert after == b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    assert reader.usage == Usage(358, 5, 256) and reader.final
    assert reader.upstream_id == "chatcmpl-92bd"
    assert reader.relayed_text() == "ck anence dst"


def test_an_abandoned_stream_knows_what_it_relayed() -> None:
    events = messages_stream(["a", "b", "c"])
    reader = EventStream("anthropic")
    sent = b"".join(reader.feed(e) for e in events[:4])
    assert sent == b"".join(events[:4])
    assert reader.usage == Usage(358, 0) and not reader.final  # the prompt, from message_start
    assert reader.relayed_text() == "ab" and reader.deltas == 2
    responses = EventStream("responses")
    for e in responses_stream(["x", "y"])[:3]:
        responses.feed(e)
    assert responses.usage is None and responses.relayed_text() == "x"


def test_what_an_abandoned_stream_is_billed() -> None:
    reader = EventStream("responses")
    for e in responses_stream([" the", " cat", "é", "\u4e2d\u6587"])[:6]:
        reader.feed(e)
    # ASCII deltas are one token each; a delta with other characters up to one per byte.
    assert (reader.deltas, reader.most_tokens) == (4, 1 + 1 + 2 + 6)
    # The model server's count, kept between one token an event and what the events can hold.
    assert relayed_tokens(4, 10, 7, {"input": "x"}) == 7
    assert relayed_tokens(4, 10, 12, {"input": "x"}) == 10  # re-tokenized longer than possible
    assert relayed_tokens(4, 10, 3, {"input": "x"}) == 4
    assert relayed_tokens(4, 10, None, {"input": "x"}) == 4  # it could not count: the events
    # Stop strings make vLLM hold ASCII text back as well: only the lower bound holds then.
    assert relayed_tokens(4, 4, 9, {"stop_sequences": ["END"]}) == 9
    assert relayed_tokens(4, 4, 9, {"stop": "\n"}) == 9


def test_error_events_in_each_dialect() -> None:
    anthropic = EventStream("anthropic").error_event("gone", "upstream_unreachable")
    assert anthropic.startswith(b"event: error\ndata: ")
    assert json.loads(anthropic.split(b"data: ")[1]) == {
        "type": "error", "error": {"type": "api_error", "message": "gone"}}
    responses = json.loads(EventStream("responses").error_event("gone", "x").split(b"data: ")[1])
    assert responses["type"] == "error" and responses["message"] == "gone"


def test_junk_is_passed_on_untouched() -> None:
    junk = b"event: response.completed\ndata: {not json\n\n: comment\n\ndata: [DONE]\n\n"
    reader = EventStream("responses")
    before, after = relay(reader, junk, 5)
    assert before + after == junk and reader.usage is None
