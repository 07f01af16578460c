"""The spool's file format: order, durability across reopen, torn tails, bounds, cleanup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ingestd import spool as spool_mod
from ingestd.errors import SpoolUnavailable
from ingestd.spool import Spool, inspect, stream_dir


def _frames(n: int, start: int = 0, size: int = 100) -> list[bytes]:
    return [f'{{"result":{{"n":{i}}}}}'.encode().ljust(size, b" ") for i in range(start, start + n)]


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def _opened(directory: Path, **kw: int) -> Spool:
    s = Spool(directory, **kw)
    s.open()
    return s


def test_frames_come_back_in_order_with_positions_across_segments(tmp_path: Path) -> None:
    s = _opened(tmp_path / "s", max_bytes=4 << 20)  # 256 KiB segments
    sent = _frames(3000, size=300)
    for i in range(0, len(sent), 250):
        s.append(sent[i : i + 250])
    assert len(_segments(tmp_path / "s")) > 1
    assert s.frames == 3000
    got = []
    while chunk := s.read(700):
        got += chunk
    assert [p for p, _ in got] == sent
    assert [pos.seq for _, pos in got] == list(range(1, 3001))
    assert s.exhausted and not s.empty
    s.ack(got[1999][1])
    assert s.frames == 1000
    s.close()


def test_a_reopened_spool_replays_from_the_last_ack(tmp_path: Path) -> None:
    d = tmp_path / "s"
    s = _opened(d)
    s.append(_frames(10))
    s.append(_frames(10, start=10))
    got = s.read(100)
    s.ack(got[6][1])
    s.close()  # like a crash after the ack of the first 7: the rest replays

    again = _opened(d)
    assert again.frames == 13
    assert [p for p, _ in again.read(100)] == _frames(13, start=7)
    again.close()


def test_a_torn_tail_after_a_crash_is_dropped_and_the_good_records_kept(tmp_path: Path) -> None:
    d = tmp_path / "s"
    s = _opened(d)
    s.append(_frames(5))
    s.close()
    seg = _segments(d)[-1]
    good = seg.stat().st_size
    with open(seg, "ab") as fh:  # half a record: a crash in the middle of an append
        fh.write(b"\x40\x00\x00\x00\x12\x34\x56\x78garbage")

    again = _opened(d)
    assert again.dropped_bytes == 15
    assert not again.corrupt
    assert seg.stat().st_size == good
    assert [p for p, _ in again.read(100)] == _frames(5)
    again.append(_frames(2, start=5))  # appends continue after the cut
    assert [p for p, _ in again.read(100)] == _frames(2, start=5)
    again.close()


def test_a_record_that_fails_its_checksum_ends_the_segment(tmp_path: Path) -> None:
    d = tmp_path / "s"
    s = _opened(d)
    s.append(_frames(4))
    s.close()
    seg = _segments(d)[-1]
    data = bytearray(seg.read_bytes())
    record = 16 + 100
    data[2 * record + 20] ^= 0xFF  # flip a payload byte of the third record
    seg.write_bytes(bytes(data))

    again = _opened(d)
    assert [p for p, _ in again.read(100)] == _frames(2)
    assert again.dropped_bytes == 2 * record
    again.close()


def test_zero_filled_blocks_after_a_crash_count_as_a_torn_tail(tmp_path: Path) -> None:
    d = tmp_path / "s"
    s = _opened(d)
    s.append(_frames(3))
    s.close()
    with open(_segments(d)[-1], "ab") as fh:
        fh.write(bytes(4096))
    again = _opened(d)
    assert again.frames == 3 and again.dropped_bytes == 4096
    again.close()


def test_append_beyond_max_bytes_is_refused_whole_and_room_returns_after_acks(
    tmp_path: Path,
) -> None:
    s = _opened(tmp_path / "s", max_bytes=64 << 10)  # 64 KiB segments: one segment
    s.append(_frames(500))  # 58 000 bytes
    with pytest.raises(SpoolUnavailable) as info:
        s.append(_frames(100, start=500))
    assert info.value.reason == "full"
    assert s.frames == 500  # nothing of the refused append landed
    got = s.read(1000)
    s.ack(got[-1][1])
    assert s.empty and s.bytes == 0 and _segments(tmp_path / "s") == []
    s.append(_frames(100, start=500))
    assert [p for p, _ in s.read(1000)] == _frames(100, start=500)
    s.close()


def test_acked_segments_are_deleted_and_an_empty_spool_leaves_no_segment(tmp_path: Path) -> None:
    d = tmp_path / "s"
    s = _opened(d, max_bytes=2 << 20)  # 128 KiB segments
    for i in range(10):
        s.append(_frames(200, start=i * 200, size=500))
    got = []
    while chunk := s.read(300):
        got += chunk
    before = len(_segments(d))
    s.ack(got[999][1])
    assert len(_segments(d)) < before
    assert s.frames == 1000
    s.ack(got[-1][1])
    assert _segments(d) == [] and s.bytes == 0 and s.oldest_age_s() == 0.0
    s.close()
    assert not d.exists()


def test_set_read_position_skips_frames_handed_over_otherwise(tmp_path: Path) -> None:
    s = _opened(tmp_path / "s")
    ends = s.append(_frames(6))
    s.set_read_position(ends[3])
    assert [p for p, _ in s.read(10)] == _frames(2, start=4)
    s.close()


def test_a_second_process_cannot_open_the_same_spool(tmp_path: Path) -> None:
    d = tmp_path / "s"
    s = _opened(d)
    # flock is per open file description: a second open() in this process stands for a
    # second process.
    with pytest.raises(SpoolUnavailable) as info:
        _opened(d)
    assert info.value.reason == "locked"
    s.close()
    _opened(d).close()


def test_inspect_reports_depth_and_age_while_another_holds_the_lock(tmp_path: Path) -> None:
    d = tmp_path / "s"
    assert inspect(d) is None
    s = _opened(d)
    s.append(_frames(8))
    got = s.read(3)
    s.ack(got[-1][1])
    stats = inspect(d)
    assert stats is not None
    assert stats.frames == 5 == s.frames
    assert stats.bytes > 5 * 100
    assert stats.oldest_appended_at is not None
    s.close()


def test_a_write_error_is_spool_unavailable_and_leaves_no_half_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = tmp_path / "s"
    s = _opened(d)
    s.append(_frames(2))

    def disk_full(fd: int, data: bytes) -> None:
        os.write(fd, bytes(data)[:50])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_mod, "_write_all", disk_full)
    with pytest.raises(SpoolUnavailable) as info:
        s.append(_frames(3, start=2))
    assert info.value.reason == "io"
    monkeypatch.undo()
    s.append(_frames(1, start=9))
    assert [p for p, _ in s.read(10)] == [*_frames(2), *_frames(1, start=9)]
    s.close()
    again = _opened(d)
    assert again.frames == 3 and again.dropped_bytes == 0
    again.close()


@pytest.mark.parametrize(
    ("name", "expected"),
    [("app", "app"), ("water-meters.v2", "water-meters.v2")],
)
def test_safe_stream_names_are_their_own_directory(name: str, expected: str) -> None:
    assert stream_dir(Path("/r"), name) == Path("/r") / expected


def test_other_stream_names_get_a_slug_and_a_hash() -> None:
    a = stream_dir(Path("/r"), "../etc/passwd")
    b = stream_dir(Path("/r"), "x" * 300)
    c = stream_dir(Path("/r"), "..")
    assert a.parent == b.parent == c.parent == Path("/r")
    assert len(b.name) < 80 and a.name != c.name
    assert "/" not in a.name and a.name not in (".", "..")


# -- [spool] configuration ------------------------------------------------------------------


def test_the_spool_directory_defaults_to_the_state_directory_then_beside_sqlite() -> None:
    from ingestd.config import SpoolSettings

    s = SpoolSettings()
    assert s.enabled and s.max_bytes == 1 << 30
    state = {"STATE_DIRECTORY": "/var/lib/ingestd"}
    assert s.root("sqlite:///ingestd.db", state) == Path("/var/lib/ingestd/spool")
    assert s.root("sqlite:////data/x.db", {}) == Path("/data/x.db-spool")
    assert s.root("postgresql+psycopg://u@h/db", {}) == Path("ingestd-spool")
    assert SpoolSettings(dir="/srv/q").root("sqlite:///a.db", state) == Path("/srv/q")


def test_spool_keys_come_from_toml_and_env_and_bad_ones_are_named(tmp_path: Path) -> None:
    from ingestd.config import load_settings
    from ingestd.errors import ConfigError

    cfg = tmp_path / "ingestd.toml"
    cfg.write_text('[spool]\ndir = "/srv/spool"\nmax_bytes = 5000000\n')
    settings = load_settings(cfg, environ={"INGESTD_SPOOL__ENABLED": "false"})
    assert (settings.spool.dir, settings.spool.max_bytes) == ("/srv/spool", 5_000_000)
    assert settings.spool.enabled is False
    cfg.write_text("[spool]\nmax_bytes = 0\nsize = 3\n")
    with pytest.raises(ConfigError) as info:
        load_settings(cfg, environ={})
    text = str(info.value)
    assert "spool.max_bytes: must be greater than 0" in text
    assert "unknown key 'size' in [spool]" in text
