"""Natural identity of an ApplicationUp message: the same whatever way it reached ingestd.

An uplink can reach ingestd by the event stream (``as.up.data.forward``), by the Storage
Integration (``GET …/packages/storage/uplink_message``) or by ``ingestd import``. Only the
stream carries an event ``unique_id``; what every source carries is the ApplicationUp
message itself, which the Application Server builds once and publishes unchanged to
events, packages (storage) and webhooks (lorawan-stack
``pkg/applicationserver/applicationserver.go``: ``processUp`` stamps ``ReceivedAt`` once
before ``publishUp``; ``publishNormalizedUplink`` copies the uplink's ``receivedAt`` into
every measurement it publishes). So the identity is built from fields of the message:

- uplinks: ``(application_id, device_id, received_at, f_cnt)``, where ``received_at`` is
  ``uplink_message.received_at`` (set by the Network Server when it received the frame),
  else ``ApplicationUp.received_at`` (set by the AS), truncated to microseconds like every
  stored time. ``f_cnt`` guards against two frames of one device in the same microsecond
  (impossible on air, possible from a simulator). An AS that processes one NS uplink twice
  produces one row, as it should.
- joins: ``(application_id, device_id, received_at)`` (the join-accept's ``received_at``,
  else the ApplicationUp's).
- downlink lifecycle events: the event's ``unique_id``. The Cloud Storage Integration keeps
  only uplink messages, so these only ever arrive by the stream.

:func:`uplink_id` hashes the uplink identity into the 32-character ``uplinks.uplink_id``
that ``uplink_receptions`` refers to. Pure and fast: it is on the per-event hot path.
"""

from __future__ import annotations

from datetime import UTC, datetime
from hashlib import blake2b

SOURCES = ("stream", "storage", "import")
"""Values of the ``source`` column of every derived row."""

UPLINK_ID_CHARS = 32


def uplink_id(application_id: str, device_id: str, received_at: datetime, f_cnt: int) -> str:
    """The uplink's natural id: a hash of (application, device, received_at µs, f_cnt).

    ``received_at`` must be timezone-aware; it is taken in UTC at microsecond resolution,
    so the same instant written with nanoseconds (events) or microseconds (a database)
    gives the same id.
    """
    t = received_at if received_at.tzinfo is UTC else received_at.astimezone(UTC)
    # The key holds received_at as ``isoformat()`` writes it (no fraction when it is zero):
    # ids stored by earlier versions stay the same. %-formatted here, at a third of the cost.
    fields = (t.year, t.month, t.day, t.hour, t.minute, t.second)
    when = _ISO % fields if t.microsecond == 0 else _ISO_US % (*fields, t.microsecond)
    key = f"{application_id}\x1f{device_id}\x1f{when}\x1f{f_cnt}"
    return blake2b(key.encode(), digest_size=UPLINK_ID_CHARS // 2).hexdigest()


_ISO = "%04d-%02d-%02dT%02d:%02d:%02d+00:00"
_ISO_US = "%04d-%02d-%02dT%02d:%02d:%02d.%06d+00:00"
