"""The ids that tie a pushed downlink to its outbox row, each written and parsed here.

Pure, like :mod:`ingestd.normalize`, which reads them out of every downlink event.

- The correlation id ``ingestd:outbox:<id>`` goes on the downlink item itself; TTS keeps
  it on every lifecycle event that carries the item (TTS_WIRE §4).
- The push's ``X-Request-ID`` is ``ingestd-outbox-<id>-<attempt>``. TTS puts it into the
  request's context id ``rpc:/ttn.lorawan.v3.AppAs/DownlinkQueuePush:<request id>`` (or
  ``…Replace:``), the only id an ``as.down.data.drop`` carries: it is published with the
  request context's ids, never the item's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

OUTBOX_CID_PREFIX = "ingestd:outbox:"
_PREFIX_LEN = len(OUTBOX_CID_PREFIX)
REQUEST_ID_PREFIX = "ingestd-outbox-"  # the X-Request-ID the downlink worker sends
# The context correlation ids TTS gives the requests the worker makes (TTS_WIRE §4).
PUSH_RPC_PREFIXES = (
    "rpc:/ttn.lorawan.v3.AppAs/DownlinkQueuePush:",
    "rpc:/ttn.lorawan.v3.AppAs/DownlinkQueueReplace:",
)
_BIGINT_MAX = 2**63 - 1  # downlink_outbox.id is a signed 64-bit integer
_BIGINT_MAX_DIGITS = len(str(_BIGINT_MAX))


def outbox_correlation_id(outbox_id: int) -> str:
    """The correlation id ingestd attaches to a pushed downlink: ``ingestd:outbox:42``."""
    if type(outbox_id) is not int or not 0 < outbox_id <= _BIGINT_MAX:
        raise ValueError(f"outbox id must be a positive 64-bit integer, got {outbox_id!r}")
    return f"{OUTBOX_CID_PREFIX}{outbox_id}"


def request_id(outbox_id: int, attempt: int) -> str:
    """``X-Request-ID`` of a push attempt: ≤ 55 chars, so TTS's ``rpc:…:<id>`` stays ≤ 100."""
    return f"{REQUEST_ID_PREFIX}{outbox_id}-{attempt}"


def outbox_id_of_request_id(value: str) -> int | None:
    """The outbox id in an ``X-Request-ID`` that :func:`request_id` wrote, or None."""
    if not value.startswith(REQUEST_ID_PREFIX):
        return None
    return _outbox_number(value[len(REQUEST_ID_PREFIX) :].partition("-")[0])


def is_push_rpc(cid: Any) -> bool:
    """True for the context correlation id of a push/replace request (see the module doc)."""
    return isinstance(cid, str) and cid.startswith(PUSH_RPC_PREFIXES)


def outbox_id_from(correlation_ids: Iterable[str] | None) -> int | None:
    """The outbox id in a list of correlation ids, or None.

    Only the exact form :func:`outbox_correlation_id` writes counts: ASCII digits without
    a leading zero, within 64 bits, so ``outbox_id_from([c]) == n`` implies
    ``c == outbox_correlation_id(n)``. Other prefixes and non-strings are skipped. With
    several outbox ids the first in the given order wins (ingestd pushes one id per item,
    so several only appear when a client adds its own).
    """
    if not correlation_ids:
        return None
    from_request_id = None
    for cid in correlation_ids:
        if type(cid) is not str:
            continue
        if cid.startswith(OUTBOX_CID_PREFIX):
            value = _outbox_number(cid[_PREFIX_LEN:])
            if value is not None:
                return value
        elif from_request_id is None and cid.startswith(PUSH_RPC_PREFIXES):
            # ``as.down.data.drop`` carries only the request's context ids; the push's
            # X-Request-ID is in its rpc: id (TTS_WIRE §4).
            from_request_id = outbox_id_of_request_id(cid.partition(":")[2].partition(":")[2])
    return from_request_id


def _outbox_number(digits: str) -> int | None:
    if (
        0 < len(digits) <= _BIGINT_MAX_DIGITS
        and digits.isascii()
        and digits.isdigit()
        and digits[0] != "0"
    ):
        value = int(digits)
        if value <= _BIGINT_MAX:
            return value
    return None
