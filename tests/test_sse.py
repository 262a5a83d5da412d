from __future__ import annotations

import json

from inference_gateway.sse import DONE, StreamFilter
from inference_gateway.usage import Usage


def chunk(i: int, usage: tuple[int, int] | None) -> bytes:
    obj: dict[str, object] = {"id": "c", "object": "chat.completion.chunk",
                              "choices": [{"index": 0, "delta": {"content": f"w{i}"}}]}
    if usage is not None:
        obj["usage"] = {"prompt_tokens": usage[0], "total_tokens": sum(usage),
                        "completion_tokens": usage[1]}
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def final(prompt: int, completion: int) -> bytes:
    obj = {"id": "c", "object": "chat.completion.chunk", "choices": [],
           "usage": {"prompt_tokens": prompt, "total_tokens": prompt + completion,
                     "completion_tokens": completion}}
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


UPSTREAM = (
    chunk(0, (5, 0)) + chunk(1, (5, 1)) + chunk(2, (5, 2)) + final(5, 2) + b"data: [DONE]\n\n"
)
PLAIN = chunk(0, None) + chunk(1, None) + chunk(2, None) + b"data: [DONE]\n\n"


def run(f: StreamFilter, data: bytes, size: int) -> bytes:
    out = b"".join(f.feed(data[i:i + size]) for i in range(0, len(data), size))
    return out + f.finish() + (DONE if f.done else b"")


def test_hides_all_usage_the_client_did_not_ask_for() -> None:
    for size in (1, 7, 64, len(UPSTREAM)):
        f = StreamFilter(keep_final_usage=False, keep_continuous_usage=False)
        assert run(f, UPSTREAM, size) == PLAIN
        assert f.usage == Usage(5, 2)


def test_keeps_final_usage_chunk_when_asked() -> None:
    f = StreamFilter(keep_final_usage=True, keep_continuous_usage=False)
    expected = PLAIN.replace(b"data: [DONE]", final(5, 2) + b"data: [DONE]")
    assert run(f, UPSTREAM, 13) == expected


def test_passes_everything_when_both_asked() -> None:
    f = StreamFilter(keep_final_usage=True, keep_continuous_usage=True)
    assert run(f, UPSTREAM, 5) == UPSTREAM
    assert f.usage == Usage(5, 2) and f.events == 4


def test_usage_tracks_the_last_event_seen() -> None:
    f = StreamFilter(keep_final_usage=False, keep_continuous_usage=False)
    f.feed(chunk(0, (5, 0)) + chunk(1, (5, 1))[:20])
    assert f.usage == Usage(5, 0)  # the half-arrived event is not counted yet


def test_done_is_held_back_until_the_caller_releases_it() -> None:
    f = StreamFilter(keep_final_usage=True, keep_continuous_usage=True)
    out = f.feed(UPSTREAM)
    assert f.done and not out.endswith(DONE) and out + DONE == UPSTREAM


def test_error_events_and_comments_pass() -> None:
    data = b": keep-alive\n\ndata: {\"error\": {\"message\": \"boom\"}}\n\ndata: [DONE]\n\n"
    f = StreamFilter(keep_final_usage=False, keep_continuous_usage=False)
    assert run(f, data, 3) == data
