"""A durable local spool of raw stream frames: what the database could not take yet.

While a commit stalls (a table lock, a busy SQLite file, an outage) the consumer keeps
reading the stream and appends the frames here instead of letting TTS's bounded per-stream
buffer drop them; once the database answers they are drained in order through the usual
batches (:mod:`ingestd.consumer`). Pure file I/O, no asyncio, no SQL.

Layout: ``<root>/<stream>/`` holds numbered segment files (``00000000000000000001.seg``, ...),
an ``ack`` file (how far the database has committed) and a ``lock`` file (``flock``: one
process per stream spool). A segment is a sequence of records::

    u32 length | u32 crc32(appended_ns + payload) | u64 appended_ns | payload

Appends are written whole and fsynced per batch, so after a crash only the last record(s)
can be torn: :meth:`Spool.open` checks every record from the ack position on and cuts the
file at the first one that does not verify. The ack position is rewritten in place after
each commit without an fsync: losing it only replays frames the database already holds,
which ``ON CONFLICT DO NOTHING`` makes harmless. Fully acknowledged segments are deleted; an
empty spool leaves no segment behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from ingestd.errors import SpoolUnavailable

log = structlog.get_logger()

MAX_BYTES_DEFAULT = 1 << 30  # 1 GiB: ~400k TTS uplinks of 2.6 KB
SEGMENT_MIN_BYTES = 64 << 10
SEGMENT_MAX_BYTES = 64 << 20
SEGMENT_SUFFIX = ".seg"
MAX_RECORD_BYTES = 64 << 20  # a longer length field can only be garbage
READ_CHUNK_BYTES = 1 << 20

_HEADER = struct.Struct("<IIQ")
_ACK = struct.Struct("<QQI")  # segment, offset, crc32 of the two
_NS = struct.Struct("<Q")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, order=True, slots=True)
class Position:
    """A place in the spool: just after a record. ``seq`` counts records since ``open``."""

    segment: int
    offset: int
    seq: int


@dataclass(frozen=True, slots=True)
class SpoolStats:
    """What ``ingestd status`` shows of a spool (read without taking its lock)."""

    bytes: int
    frames: int
    oldest_appended_at: float | None  # Unix time of the oldest frame not yet committed


def stream_dir(root: Path, stream: str) -> Path:
    """The directory of ``stream``'s spool: its name when that is a safe file name, else a
    slug plus a hash (stream names are free text)."""
    if _SAFE_NAME.fullmatch(stream) and stream not in (".", ".."):
        return root / stream
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", stream)[:40].strip("._") or "stream"
    return root / f"{slug}-{hashlib.sha256(stream.encode()).hexdigest()[:16]}"


def segment_bytes_for(max_bytes: int) -> int:
    """Segments of 1/16 of the bound (64 KiB .. 64 MiB): acked space is freed in steps."""
    return min(max(max_bytes // 16, SEGMENT_MIN_BYTES), SEGMENT_MAX_BYTES)


class Spool:
    """One stream's spool. Thread-safe: the consumer appends, reads and acks from threads.

    One appender at a time (the consumer serialises appends); reads and acks may run
    concurrently with an append.
    """

    def __init__(self, directory: Path, *, max_bytes: int = MAX_BYTES_DEFAULT) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes_for(max_bytes)
        self._lock = threading.Lock()  # metadata; taken after _append_lock, never before
        self._append_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._segments: dict[int, int] = {}  # segment number -> size on disk
        self._write_fd: int | None = None
        self._write_segment = 0
        self._end = Position(1, 0, 0)  # after the last record
        self._read = self._end  # the next record to hand out
        self._ack = self._end  # committed up to here
        self._oldest_ns: int | None = None  # appended_ns of the record at _ack
        self._read_fd: tuple[int, int] | None = None  # (segment, fd)
        self.dropped_bytes = 0  # torn or corrupt bytes cut at open
        self.corrupt = False  # a record failed its check before the last segment's tail

    # -- opening and closing -------------------------------------------------------------

    def open(self) -> None:
        """Lock the directory, verify every unacknowledged record, cut a torn tail.

        Raises :class:`SpoolUnavailable` (reason ``locked``) when another process holds it.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolUnavailable(
                f"the spool {self.directory} is in use by another ingestd process",
                reason="locked",
            ) from None
        self._lock_fd = fd
        numbers = sorted(_segment_numbers(self.directory))
        ack_seg, ack_off = self._read_ack()
        for n in numbers:
            if n < ack_seg:  # acknowledged, its deletion was interrupted
                _unlink(self._segment_path(n))
        numbers = [n for n in numbers if n >= ack_seg]
        if not numbers:
            self._reset(max(ack_seg, 1))
            return
        if numbers[0] > ack_seg:
            ack_seg, ack_off = numbers[0], 0
        seq = 0
        oldest: int | None = None
        for i, n in enumerate(numbers):
            start = ack_off if n == ack_seg else 0
            count, good_end, first_ns = _scan(self._segment_path(n), start)
            size = self._segment_path(n).stat().st_size
            if good_end < size:
                self.dropped_bytes += size - good_end
                if i < len(numbers) - 1:
                    self.corrupt = True
                    log.error("spool_corrupt", segment=n, offset=good_end, bytes=size - good_end)
                else:
                    log.warning("spool_torn_tail_dropped", segment=n, bytes=size - good_end)
                with open(self._segment_path(n), "r+b") as fh:
                    fh.truncate(good_end)
                    os.fsync(fh.fileno())
            self._segments[n] = good_end
            if oldest is None:
                oldest = first_ns
            seq += count
        last = numbers[-1]
        self._ack = self._read = Position(ack_seg, min(ack_off, self._segments[ack_seg]), 0)
        self._end = Position(last, self._segments[last], seq)
        self._oldest_ns = oldest
        self._write_segment = last
        self._write_fd = os.open(self._segment_path(last), os.O_WRONLY | os.O_APPEND)
        if self.empty:
            self._discard_all()

    def close(self) -> None:
        """Release the files and the lock; an empty spool leaves only its directory."""
        with self._append_lock, self._lock:
            self._close_fds()
            if self._lock_fd is None:
                return
            empty = self.empty
            if empty:
                self._discard_all()
                _unlink(self.directory / "ack")
                _unlink(self.directory / "lock")
            os.close(self._lock_fd)
            self._lock_fd = None
        if empty:  # leave no trace: the directories come back when next needed
            for directory in (self.directory, self.directory.parent):
                with contextlib.suppress(OSError):
                    directory.rmdir()

    # -- the three operations ----------------------------------------------------------

    def append(self, frames: Sequence[bytes]) -> list[Position]:
        """Write ``frames`` durably (one write and one fsync); the end position of each.

        Raises :class:`SpoolUnavailable` (``full`` beyond ``max_bytes``, ``io`` on an
        ``OSError`` such as a full disk); nothing of this call is then in the spool.
        """
        if not frames:
            return []
        now_ns = time.time_ns()
        stamp = _NS.pack(now_ns)
        base = zlib.crc32(stamp)
        parts: list[bytes] = []
        sizes: list[int] = []
        for payload in frames:
            header = _HEADER.pack(len(payload), zlib.crc32(payload, base), now_ns)
            parts += (header, payload)
            sizes.append(_HEADER.size + len(payload))
        total = sum(sizes)
        with self._append_lock:  # held across the fsync: an ack may not discard meanwhile
            with self._lock:
                on_disk = sum(self._segments.values())
                end = self._end
            if on_disk + total > self.max_bytes:
                raise SpoolUnavailable(
                    f"the spool holds {on_disk} bytes; {total} more exceed max_bytes "
                    f"{self.max_bytes}",
                    reason="full",
                )
            segment, offset = end.segment, end.offset
            try:
                if self._write_fd is None or (offset > 0 and offset + total > self.segment_bytes):
                    segment, offset = self._start_segment(end)
                assert self._write_fd is not None
                _write_all(self._write_fd, b"".join(parts))
                os.fsync(self._write_fd)
            except OSError as exc:
                self._recover_write(segment, offset)
                raise SpoolUnavailable(f"cannot write the spool: {exc}", reason="io") from exc
            ends: list[Position] = []
            seq = end.seq
            for size in sizes:
                offset += size
                seq += 1
                ends.append(Position(segment, offset, seq))
            with self._lock:
                self._segments[segment] = offset
                was_empty = self._ack.seq >= self._end.seq
                self._end = ends[-1]
                if was_empty:
                    self._oldest_ns = now_ns
        return ends

    def read(self, max_frames: int) -> list[tuple[bytes, Position]]:
        """Up to ``max_frames`` records from the read position on, each with its end."""
        out: list[tuple[bytes, Position]] = []
        with self._lock:
            pos, end = self._read, self._end
            sizes = dict(self._segments)
        while len(out) < max_frames and pos.seq < end.seq:
            size = end.offset if pos.segment == end.segment else sizes.get(pos.segment, 0)
            if pos.offset >= size:
                pos = Position(pos.segment + 1, 0, pos.seq)
                continue
            fd = self._reader_fd(pos.segment)
            data = os.pread(fd, min(size - pos.offset, READ_CHUNK_BYTES), pos.offset)
            at = 0
            while len(out) < max_frames and at + _HEADER.size <= len(data):
                length = _HEADER.unpack_from(data, at)[0]
                stop = at + _HEADER.size + length
                if stop > len(data):
                    if at:
                        break  # the rest of this record comes with the next chunk
                    data = os.pread(fd, stop, pos.offset)  # one record over the chunk size
                    if len(data) < stop:
                        raise SpoolUnavailable(f"spool segment {pos.segment} is short", reason="io")
                pos = Position(pos.segment, pos.offset + stop - at, pos.seq + 1)
                out.append((data[at + _HEADER.size : stop], pos))
                at = stop
        with self._lock:
            if out and out[-1][1] > self._read:
                self._read = out[-1][1]
        return out

    def ack(self, pos: Position) -> None:
        """Everything up to ``pos`` is committed: persist that, delete finished segments."""
        with self._lock:
            if pos <= self._ack:
                return
            self._ack = pos
            done = [n for n in self._segments if n < pos.segment]
            for n in done:
                del self._segments[n]
            empty = self._ack.seq >= self._end.seq
        for n in done:
            if self._read_fd is not None and self._read_fd[0] == n:
                self._close_read_fd()
            _unlink(self._segment_path(n))
        if empty:
            with self._append_lock, self._lock:
                if self._ack.seq >= self._end.seq:
                    self._discard_all()
            return
        self._write_ack(pos)
        oldest = self._peek_ns(pos)
        with self._lock:
            if self._ack == pos:
                self._oldest_ns = oldest

    def set_read_position(self, pos: Position) -> None:
        """Skip to ``pos``: records before it were handed to the builder some other way."""
        with self._lock:
            if pos > self._read:
                self._read = pos

    # -- state ---------------------------------------------------------------------------

    @property
    def empty(self) -> bool:
        """True when every record is committed."""
        return self._ack.seq >= self._end.seq

    @property
    def exhausted(self) -> bool:
        """True when every record has been read (it may not be committed yet)."""
        return self._read.seq >= self._end.seq

    @property
    def frames(self) -> int:
        """Records not yet committed."""
        return self._end.seq - self._ack.seq

    @property
    def bytes(self) -> int:
        """Bytes on disk (including the committed start of the oldest segment)."""
        with self._lock:
            return sum(self._segments.values()) if not self.empty else 0

    def oldest_age_s(self, now: float | None = None) -> float:
        """Age of the oldest frame not yet committed; 0 when empty."""
        oldest = self._oldest_ns
        if oldest is None or self.empty:
            return 0.0
        return max((now if now is not None else time.time()) - oldest / 1e9, 0.0)

    # -- internals -----------------------------------------------------------------------

    def _segment_path(self, n: int) -> Path:
        return self.directory / f"{n:020d}{SEGMENT_SUFFIX}"

    def _reset(self, segment: int) -> None:
        self._segments = {}
        self._end = self._read = self._ack = Position(segment, 0, 0)
        self._oldest_ns = None

    def _start_segment(self, end: Position) -> tuple[int, int]:
        n = end.segment + 1 if end.offset > 0 else end.segment
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC
        self._write_fd = os.open(self._segment_path(n), flags, 0o600)
        self._write_segment = n
        _fsync_dir(self.directory)
        with self._lock:
            self._segments[n] = 0
            if self._end.segment != n:
                self._end = Position(n, 0, end.seq)
                if self._ack == end:
                    self._ack = self._end
                if self._read == end:
                    self._read = self._end
        return n, 0

    def _recover_write(self, segment: int, offset: int) -> None:
        """After a failed write, cut what may have landed so no half record remains."""
        with contextlib.suppress(OSError):
            os.truncate(self._segment_path(segment), offset)

    def _reader_fd(self, n: int) -> int:
        if self._read_fd is not None and self._read_fd[0] == n:
            return self._read_fd[1]
        self._close_read_fd()
        fd = os.open(self._segment_path(n), os.O_RDONLY)
        self._read_fd = (n, fd)
        return fd

    def _close_read_fd(self) -> None:
        if self._read_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._read_fd[1])
            self._read_fd = None

    def _close_fds(self) -> None:
        self._close_read_fd()
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None

    def _discard_all(self) -> None:
        """Delete every segment of a fully committed spool; the next append starts anew."""
        self._close_fds()
        for n in list(self._segments) or _segment_numbers(self.directory):
            _unlink(self._segment_path(n))
        nxt = self._end.segment + 1
        self._segments = {}
        self._end = self._read = self._ack = Position(nxt, 0, self._end.seq)
        self._oldest_ns = None
        self._write_ack(self._end)

    def _peek_ns(self, pos: Position) -> int | None:
        try:
            with open(self._segment_path(pos.segment), "rb") as fh:
                fh.seek(pos.offset)
                head = fh.read(_HEADER.size)
                if len(head) < _HEADER.size:  # at the end of a segment: the next one
                    with open(self._segment_path(pos.segment + 1), "rb") as nxt:
                        head = nxt.read(_HEADER.size)
        except OSError:
            return None
        return _HEADER.unpack(head)[2] if len(head) == _HEADER.size else None

    def _read_ack(self) -> tuple[int, int]:
        try:
            data = (self.directory / "ack").read_bytes()
        except FileNotFoundError:
            return 0, 0
        if len(data) != _ACK.size:
            return 0, 0
        segment, offset, crc = _ACK.unpack(data)
        if zlib.crc32(data[:16]) != crc:
            return 0, 0  # replay everything: harmless, only slower
        return segment, offset

    def _write_ack(self, pos: Position) -> None:
        body = struct.pack("<QQ", pos.segment, pos.offset)
        data = body + struct.pack("<I", zlib.crc32(body))
        try:
            fd = os.open(self.directory / "ack", os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.pwrite(fd, data, 0)  # 20 bytes in one sector: no torn ack in practice
            finally:
                os.close(fd)
        except OSError as exc:  # only costs a longer replay after a restart
            log.warning("spool_ack_not_saved", error=str(exc))


def inspect(directory: Path) -> SpoolStats | None:
    """Depth and age of the spool in ``directory`` without locking or changing it (headers
    only, no checksums): for ``ingestd status`` while the daemon runs."""
    if not directory.is_dir():
        return None
    ack_seg, ack_off = Spool(directory)._read_ack()
    frames = size = 0
    oldest: int | None = None
    for n in sorted(_segment_numbers(directory)):
        if n < ack_seg:
            continue
        path = directory / f"{n:020d}{SEGMENT_SUFFIX}"
        try:
            with open(path, "rb") as fh:
                total = os.fstat(fh.fileno()).st_size
                at = ack_off if n == ack_seg else 0
                size += total - at
                while at + _HEADER.size <= total:
                    fh.seek(at)
                    length, _crc, ns = _HEADER.unpack(fh.read(_HEADER.size))
                    if length == 0 or at + _HEADER.size + length > total:
                        break
                    oldest = ns if oldest is None else oldest
                    frames += 1
                    at += _HEADER.size + length
        except OSError:
            continue
    return SpoolStats(
        bytes=size if frames else 0,
        frames=frames,
        oldest_appended_at=None if oldest is None else oldest / 1e9,
    )


def _segment_numbers(directory: Path) -> list[int]:
    out = []
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            stem, dot, suffix = entry.name.partition(".")
            if dot and "." + suffix == SEGMENT_SUFFIX and stem.isdigit():
                out.append(int(stem))
    return out


def _scan(path: Path, start: int) -> tuple[int, int, int | None]:
    """``(records, end of the last good record, appended_ns of the first)`` from ``start``."""
    count = 0
    first_ns: int | None = None
    with open(path, "rb") as fh:
        fh.seek(start)
        at = start
        while True:
            head = fh.read(_HEADER.size)
            if len(head) < _HEADER.size:
                break
            length, crc, ns = _HEADER.unpack(head)
            if length == 0 or length > MAX_RECORD_BYTES:
                break
            payload = fh.read(length)
            if len(payload) < length or zlib.crc32(payload, zlib.crc32(_NS.pack(ns))) != crc:
                break
            count += 1
            first_ns = ns if first_ns is None else first_ns
            at += _HEADER.size + length
    return count, at, first_ns


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
