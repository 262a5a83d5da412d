from __future__ import annotations

import json

from inference_gateway.metering.readers import Usage
from inference_gateway.proxy.sse import DONE, StreamFilter


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


# Shapes captured from vLLM 0.32: the same stream asked with usage on, and as a client that did
# not ask for usage receives it from vLLM directly.
_HEAD = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
VLLM_WITH_USAGE = (
    _HEAD + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
    b'"finish_reason":null}],"usage":{"prompt_tokens":21,"total_tokens":21,"completion_tokens":0,'
    b'"completion_tokens_details":null},"prompt_token_ids":null,"prompt_text":null}\n\n'
    + _HEAD + b'"choices":[{"index":0,"delta":{"content":" quick"},"logprobs":null,'
    b'"finish_reason":null,"token_ids":null}],"usage":{"prompt_tokens":21,"total_tokens":22,'
    b'"completion_tokens":1,"completion_tokens_details":null}}\n\n'
    + _HEAD + b'"choices":[{"index":0,"delta":{"content":" Pack"},"logprobs":null,'
    b'"finish_reason":"length","stop_reason":null,"token_ids":null}],"usage":{"prompt_tokens":21,'
    b'"total_tokens":23,"completion_tokens":2,"completion_tokens_details":null}}\n\n'
    + _HEAD + b'"choices":[],"usage":{"prompt_tokens":21,"total_tokens":23,'
    b'"completion_tokens":2},"system_fingerprint":"vllm-0.32.0-b8a3500c"}\n\n'
    b"data: [DONE]\n\n"
)
VLLM_WITHOUT_USAGE = (
    _HEAD + b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
    b'"finish_reason":null}],"prompt_token_ids":null,"prompt_text":null}\n\n'
    + _HEAD + b'"choices":[{"index":0,"delta":{"content":" quick"},"logprobs":null,'
    b'"finish_reason":null,"token_ids":null}]}\n\n'
    + _HEAD + b'"choices":[{"index":0,"delta":{"content":" Pack"},"logprobs":null,'
    b'"finish_reason":"length","stop_reason":null,"token_ids":null}],'
    b'"system_fingerprint":"vllm-0.32.0-b8a3500c"}\n\n'
    b"data: [DONE]\n\n"
)


def test_matches_vllm_byte_for_byte_when_usage_was_not_asked() -> None:
    for size in (1, 50, len(VLLM_WITH_USAGE)):
        f = StreamFilter(keep_final_usage=False, keep_continuous_usage=False)
        assert run(f, VLLM_WITH_USAGE, size) == VLLM_WITHOUT_USAGE
        assert f.usage == Usage(21, 2)


def test_a_finished_choice_is_released_when_the_stream_breaks_off() -> None:
    f = StreamFilter(keep_final_usage=False, keep_continuous_usage=False)
    cut = VLLM_WITH_USAGE.index(b'"choices":[],')
    upto_finish = VLLM_WITH_USAGE[: VLLM_WITH_USAGE.rindex(b"data: ", 0, cut)]
    out = f.feed(upto_finish) + f.finish()
    assert out.count(b"data: ") == 3 and out.endswith(b'"token_ids":null}]}\n\n')


def two_choices(with_usage: bool) -> bytes:
    """An n=2 stream as vLLM sends it with usage on, or (without) as a client gets it directly."""
    fp = b',"system_fingerprint":"vllm-0.32.0-b8a3500c"'

    def c(i: int, text: str, finish: bool) -> bytes:
        reason = b'"length"' if finish else b"null"
        body = (_HEAD + b'"choices":[{"index":%d,"delta":{"content":"%s"},"finish_reason":%s}]'
                % (i, text.encode(), reason))
        if with_usage:
            body += b',"usage":{"prompt_tokens":3,"total_tokens":4,"completion_tokens":1}'
        elif finish:
            body += fp
        return body + b"}\n\n"

    events = c(0, "a", False) + c(1, "b", False) + c(0, "c", True) + c(1, "d", False) + c(
        1, "e", True)
    if with_usage:
        events += (_HEAD + b'"choices":[],"usage":{"prompt_tokens":3,"total_tokens":7,'
                   b'"completion_tokens":4}' + fp + b"}\n\n")
    return events + b"data: [DONE]\n\n"


def test_every_finished_choice_gets_the_fingerprint_back() -> None:
    first = StreamFilter(keep_final_usage=False, keep_continuous_usage=False)
    assert run(first, two_choices(True), 17) == two_choices(False)
    assert first.learned == b',"system_fingerprint":"vllm-0.32.0-b8a3500c"'
    # Once the server's trailer is known, a finished choice is passed on at once.
    second = StreamFilter(keep_final_usage=False, keep_continuous_usage=False,
                          trailer=first.learned)
    upstream = two_choices(True)
    upto = upstream.index(b'"content":"d"')
    early = second.feed(upstream[: upstream.rindex(b"data: ", 0, upto)])
    assert early.endswith(b'"finish_reason":"length"}],"system_fingerprint":'
                          b'"vllm-0.32.0-b8a3500c"}\n\n')
    rest = upstream[upstream.rindex(b"data: ", 0, upto):]
    assert early + second.feed(rest) + DONE == two_choices(False)
