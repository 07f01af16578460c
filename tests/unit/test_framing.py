"""The frame decoder on every framing TTS (or a proxy) may send, split at every byte."""

from __future__ import annotations

import time

import orjson
import pytest

from ingestd.errors import MalformedEvent
from ingestd.framing import ErrorFrame, EventFrame, FrameDecoder, parse_frame

EV1 = b'{"result":{"name":"as.up.data.forward","unique_id":"01A","data":{"t":"a\\nb"}}}'
EV2 = b'{"result":{"name":"as.up.join.forward","unique_id":"01B"}}'
ERR = (
    b'{"error":{"code":16,"message":"error:pkg/identityserver:api_key_expired (expired)",'
    b'"details":[{"@type":"type.googleapis.com/ttn.lorawan.v3.ErrorDetails",'
    b'"namespace":"pkg/identityserver","name":"api_key_expired","code":16}]}}'
)

FRAMINGS = {
    "blank-line": EV1 + b"\n\n" + EV2 + b"\n\n",
    "ndjson": EV1 + b"\n" + EV2 + b"\n",
    "sse": b"data: " + EV1 + b"\n\n" + b"data:" + EV2 + b"\n\n",
    "blank-line-crlf": EV1 + b"\r\n\r\n" + EV2 + b"\r\n\r\n",
    "sse-crlf-comments-fields": (
        b": keep-alive\r\nevent: message\r\nid: 1\r\ndata: " + EV1 + b"\r\n\r\n"
        b"retry: 1000\r\ndata: " + EV2 + b"\r\n\r\n"
    ),
}


def _decode_in_chunks(body: bytes, size: int) -> list[bytes]:
    dec = FrameDecoder()
    out: list[bytes] = []
    for i in range(0, len(body), size):
        out += dec.feed(body[i : i + size])
    return out + dec.flush()


@pytest.mark.parametrize("framing", list(FRAMINGS))
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 64, 10_000])
def test_every_framing_yields_both_events_on_any_chunk_boundary(
    framing: str, chunk_size: int
) -> None:
    assert _decode_in_chunks(FRAMINGS[framing], chunk_size) == [EV1, EV2]


def test_every_split_point_of_a_blank_line_stream_gives_the_same_frames() -> None:
    body = FRAMINGS["blank-line"]
    for cut in range(len(body) + 1):
        dec = FrameDecoder()
        assert dec.feed(body[:cut]) + dec.feed(body[cut:]) + dec.flush() == [EV1, EV2]


def test_multi_line_sse_data_is_joined_with_newlines() -> None:
    body = b'data: {"result":\ndata: {"name":"x","unique_id":"1"}}\n\n'
    frames = _decode_in_chunks(body, 5)
    assert frames == [b'{"result":\n{"name":"x","unique_id":"1"}}']
    parsed = parse_frame(frames[0])
    assert isinstance(parsed, EventFrame)
    assert parsed.event["name"] == "x"


def test_unterminated_last_frame_is_returned_by_flush() -> None:
    dec = FrameDecoder()
    assert dec.feed(EV1) == []
    assert dec.pending_bytes == len(EV1)
    assert dec.flush() == [EV1]
    assert dec.pending_bytes == 0


def test_a_garbage_line_is_passed_on_for_rejection_and_decoding_continues() -> None:
    frames = _decode_in_chunks(b"not json at all\n\n" + EV1 + b"\n\n", 4)
    assert frames == [b"not json at all", EV1]
    with pytest.raises(MalformedEvent, match="not valid JSON"):
        parse_frame(frames[0])


def test_result_frame_parses_to_the_event() -> None:
    parsed = parse_frame(EV1)
    assert isinstance(parsed, EventFrame)
    assert parsed.event == orjson.loads(EV1)["result"]
    assert parsed.event["data"]["t"] == "a\nb"


def test_error_frame_carries_the_tts_error_name() -> None:
    parsed = parse_frame(ERR)
    assert isinstance(parsed, ErrorFrame)
    assert parsed.error.code == 16
    assert parsed.error.name == "api_key_expired"
    assert parsed.error.namespace == "pkg/identityserver"
    assert "pkg/identityserver:api_key_expired" in parsed.error.describe()


def test_bare_status_without_error_wrapper_is_an_error() -> None:
    parsed = parse_frame(b'{"code":3,"message":"invalid character \'x\' looking for value"}')
    assert isinstance(parsed, ErrorFrame)
    assert parsed.error.code == 3
    assert parsed.error.name is None
    assert "invalid character" in parsed.error.describe()


def test_bare_event_document_is_accepted_for_captures() -> None:
    parsed = parse_frame(
        b'{"name":"as.up.data.forward","unique_id":"01C","time":"2024-01-01T00:00:00Z"}'
    )
    assert isinstance(parsed, EventFrame)
    assert parsed.event["unique_id"] == "01C"


@pytest.mark.parametrize("payload", [b"[1,2]", b'{"result": 5}', b'{"foo": "bar"}', b"42"])
def test_json_that_is_not_a_frame_is_malformed(payload: bytes) -> None:
    with pytest.raises(MalformedEvent):
        parse_frame(payload)


def test_a_runaway_line_is_skipped_with_a_marker_and_decoding_recovers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ingestd import framing

    monkeypatch.setattr(framing, "MAX_FRAME_BYTES", 100)
    dec = FrameDecoder()
    out = dec.feed(b'{"result":' + b"x" * 150)  # no newline, past the limit
    out += dec.feed(b"y" * 500)  # still the same runaway line: dropped
    out += dec.feed(b"z\n\n" + EV1 + b"\n\n")
    assert len(out) == 2
    assert out[0].startswith(b"<frame longer than")
    assert out[1] == EV1
    assert dec.pending_bytes == 0


def test_a_flood_of_sse_data_lines_is_bounded_and_skipped_to_the_event_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``data:`` lines count toward the frame bound: a flood never grows past it."""
    from ingestd import framing

    monkeypatch.setattr(framing, "MAX_FRAME_BYTES", 1000)
    dec = FrameDecoder()
    out: list[bytes] = []
    held = 0
    for _ in range(5000):  # 50 kB of data: lines in one SSE event, 50x the bound
        out += dec.feed(b"data: 012345\n")
        held = max(held, dec.pending_bytes)
    out += dec.feed(b"\n" + b"data: " + EV1 + b"\n\n")
    assert held <= 1000
    assert out == [framing.OVERSIZED_FRAME, EV1]  # one marker, no truncated frame
    assert dec.pending_bytes == 0


def test_a_data_line_and_a_partial_line_count_together_toward_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ingestd import framing

    monkeypatch.setattr(framing, "MAX_FRAME_BYTES", 100)
    dec = FrameDecoder()
    assert dec.feed(b"data: " + b"a" * 60 + b"\n") == []
    assert dec.feed(b"data: " + b"b" * 30) == []  # 61 + 36 pending: still within
    assert dec.feed(b"b" * 10) == [framing.OVERSIZED_FRAME]
    assert dec.pending_bytes == 0
    assert dec.feed(b"bbb\ndata: more\n\n" + EV2 + b"\n") == [EV2]


@pytest.mark.parametrize("chunk_size", [7, 150, 10_000])
def test_a_runaway_line_is_one_marker_whatever_the_chunking(
    monkeypatch: pytest.MonkeyPatch, chunk_size: int
) -> None:
    from ingestd import framing

    monkeypatch.setattr(framing, "MAX_FRAME_BYTES", 100)
    body = b'{"result":' + b"x" * 500 + b"}\n\n" + EV1 + b"\n\n" + b"{" + b"y" * 99 + b"\n"
    frames = _decode_in_chunks(body, chunk_size)
    assert frames == [framing.OVERSIZED_FRAME, EV1, b"{" + b"y" * 99]


def _feed_timed(chunks: list[bytes]) -> tuple[float, list[bytes]]:
    dec = FrameDecoder()
    out: list[bytes] = []
    started = time.perf_counter()
    for c in chunks:
        out += dec.feed(c)
    return time.perf_counter() - started, out


def test_a_line_past_16_mib_fed_in_1_kib_chunks_is_rejected_in_linear_time() -> None:
    """Each chunk of a long partial line is searched and kept once, never re-copied.

    Joining the partial line on every chunk (``tail + chunk``) copies ~16 MiB² / 2 KiB =
    128 GiB here; kept as a list it is 16 MiB. The bound is the same work on 1 KiB chunks
    of short lines (a linear baseline measured in this run), times a generous factor.
    """
    from ingestd.framing import MAX_FRAME_BYTES, OVERSIZED_FRAME

    n = MAX_FRAME_BYTES // 1024 + 8
    runaway = [b'{"result":"' + b"x" * 1013] + [b"x" * 1024] * (n - 1) + [b'"}\n']
    line = b"x" * 1023 + b"\n"
    baseline_s, _ = _feed_timed([line] * n)
    elapsed_s, frames = _feed_timed(runaway)
    assert frames == [OVERSIZED_FRAME]
    assert elapsed_s < 20 * baseline_s + 0.25, (elapsed_s, baseline_s)


def test_chunks_of_only_blank_lines_end_an_open_sse_event_and_are_otherwise_skipped() -> None:
    dec = FrameDecoder()
    assert dec.feed(b"data: " + EV1 + b"\n") == []
    assert dec.feed(b"\n\n\n\n") == [EV1]  # the first blank line ends the event
    for _ in range(1000):  # a flood of nothing but newlines: no frames, nothing held
        assert dec.feed(b"\n" * 65536) == []
    assert dec.pending_bytes == 0
    assert dec.feed(EV2 + b"\n\n") == [EV2]
