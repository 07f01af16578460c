"""TTS rights: what ingestd needs, how TTS expands implied rights, and asking TTS for a key's.

Facts (lorawan-stack v3.32):

- The ``Right`` enum: ``api/ttn/lorawan/v3/rights.proto``.
- Implied rights: ``pkg/ttnpb/rights.go`` ``Right.Implied`` / ``Rights.Implied``, one level:
  ``RIGHT_APPLICATION_ALL`` → every ``RIGHT_APPLICATION_*``; ``RIGHT_APPLICATION_LINK`` → INFO,
  TRAFFIC_READ and TRAFFIC_DOWN_WRITE; ``RIGHT_ALL`` → every right; the other ``*_ALL`` →
  their family (``RIGHT_CLIENT_ALL`` → four named client rights).
- A stream opens with *any* right on the entity (``pkg/auth/rights/require.go`` ``RequireAny``
  from ``pkg/events/grpc/grpc.go``); each event is then sent only if the key's implied rights
  intersect ``event.visibility.rights`` (an empty visibility is visible to all:
  ``pkg/auth/rights/rightsutil/rightsutil.go`` ``EventIsVisible``). ``as.*`` traffic events
  carry ``RIGHT_APPLICATION_TRAFFIC_READ`` (``pkg/applicationserver/observability.go``), so a
  key without it gets a healthy-looking stream with nothing in it.
- Push/replace need ``RIGHT_APPLICATION_TRAFFIC_DOWN_WRITE``, listing the queue needs
  TRAFFIC_READ (``pkg/applicationserver/io/grpc/grpc.go``); short of that TTS answers 403
  ``insufficient_application_rights`` with ``attributes.missing``.
- ``GET /api/v3/applications/{application_id}/rights`` (``ApplicationAccess.ListRights``,
  ``api/ttn/lorawan/v3/api.swagger.json``) answers ``{"rights":[…]}``: the key's implied rights
  intersected with the application rights (``pkg/identityserver/application_access.go``,
  ``entity_access.go``), in no particular order; ``{}`` when it has none (also for an unknown
  application). It needs no particular right itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import httpx
import orjson

from ingestd import tts
from ingestd.errors import RequestRejected

TRAFFIC_READ = "RIGHT_APPLICATION_TRAFFIC_READ"
TRAFFIC_DOWN_WRITE = "RIGHT_APPLICATION_TRAFFIC_DOWN_WRITE"
DEVICES_READ = "RIGHT_APPLICATION_DEVICES_READ"
APPLICATION_ALL = "RIGHT_APPLICATION_ALL"
APPLICATION_LINK = "RIGHT_APPLICATION_LINK"
ALL = "RIGHT_ALL"

# The rights ingestd needs per capability: what TTS checks for the calls it makes.
STREAM_TRAFFIC: frozenset[str] = frozenset({TRAFFIC_READ})  # as.* events are visible
DOWNLINKS: frozenset[str] = frozenset({TRAFFIC_DOWN_WRITE})  # down/push, down/replace
NEEDED: Mapping[str, frozenset[str]] = {"stream": STREAM_TRAFFIC, "downlinks": DOWNLINKS}
# What a missing right costs, and what the Console calls it (its API key rights form).
CONSEQUENCES: Mapping[str, str] = {
    TRAFFIC_READ: "TTS opens the stream but sends none of its uplink or downlink events",
    TRAFFIC_DOWN_WRITE: "downlink pushes fail with 403 insufficient_application_rights",
}
CONSOLE_LABELS: Mapping[str, str] = {
    TRAFFIC_READ: "Read application traffic (uplink and downlink)",
    TRAFFIC_DOWN_WRITE: "Write downlink application traffic",
}

# ``rights.proto`` enum order (``right_invalid`` = 0 is not a right), without the prefix.
_ENUM = (
    "USER_INFO USER_SETTINGS_BASIC USER_SETTINGS_API_KEYS USER_DELETE USER_AUTHORIZED_CLIENTS "
    "USER_APPLICATIONS_LIST USER_APPLICATIONS_CREATE USER_GATEWAYS_LIST USER_GATEWAYS_CREATE "
    "USER_CLIENTS_LIST USER_CLIENTS_CREATE USER_ORGANIZATIONS_LIST USER_ORGANIZATIONS_CREATE "
    "USER_NOTIFICATIONS_READ USER_ALL "
    "APPLICATION_INFO APPLICATION_SETTINGS_BASIC APPLICATION_SETTINGS_API_KEYS "
    "APPLICATION_SETTINGS_COLLABORATORS APPLICATION_SETTINGS_PACKAGES APPLICATION_DELETE "
    "APPLICATION_DEVICES_READ APPLICATION_DEVICES_WRITE APPLICATION_DEVICES_READ_KEYS "
    "APPLICATION_DEVICES_WRITE_KEYS APPLICATION_TRAFFIC_READ APPLICATION_TRAFFIC_UP_WRITE "
    "APPLICATION_TRAFFIC_DOWN_WRITE APPLICATION_LINK APPLICATION_ALL "
    "CLIENT_ALL CLIENT_INFO CLIENT_SETTINGS_BASIC CLIENT_SETTINGS_COLLABORATORS CLIENT_DELETE "
    "GATEWAY_INFO GATEWAY_SETTINGS_BASIC GATEWAY_SETTINGS_API_KEYS "
    "GATEWAY_SETTINGS_COLLABORATORS GATEWAY_DELETE GATEWAY_TRAFFIC_READ "
    "GATEWAY_TRAFFIC_DOWN_WRITE GATEWAY_LINK GATEWAY_STATUS_READ GATEWAY_LOCATION_READ "
    "GATEWAY_WRITE_SECRETS GATEWAY_READ_SECRETS GATEWAY_ALL "
    "ORGANIZATION_INFO ORGANIZATION_SETTINGS_BASIC ORGANIZATION_SETTINGS_API_KEYS "
    "ORGANIZATION_SETTINGS_MEMBERS ORGANIZATION_DELETE ORGANIZATION_APPLICATIONS_LIST "
    "ORGANIZATION_APPLICATIONS_CREATE ORGANIZATION_GATEWAYS_LIST ORGANIZATION_GATEWAYS_CREATE "
    "ORGANIZATION_CLIENTS_LIST ORGANIZATION_CLIENTS_CREATE ORGANIZATION_ADD_AS_COLLABORATOR "
    "ORGANIZATION_ALL SEND_INVITES ALL"
)
ALL_RIGHTS: tuple[str, ...] = tuple("RIGHT_" + name for name in _ENUM.split())


def _family(prefix: str) -> frozenset[str]:
    return frozenset(r for r in ALL_RIGHTS if r.startswith(prefix))


APPLICATION_RIGHTS = _family("RIGHT_APPLICATION_")  # ttnpb.AllApplicationRights
_IMPLIED: Mapping[str, frozenset[str]] = {
    "RIGHT_USER_ALL": _family("RIGHT_USER_"),
    APPLICATION_ALL: APPLICATION_RIGHTS,
    APPLICATION_LINK: frozenset({"RIGHT_APPLICATION_INFO", TRAFFIC_READ, TRAFFIC_DOWN_WRITE}),
    "RIGHT_GATEWAY_ALL": _family("RIGHT_GATEWAY_"),
    "RIGHT_GATEWAY_LINK": frozenset({"RIGHT_GATEWAY_INFO"}),
    "RIGHT_ORGANIZATION_ALL": _family("RIGHT_ORGANIZATION_"),
    ALL: frozenset(ALL_RIGHTS),
    "RIGHT_CLIENT_ALL": frozenset(
        {
            "RIGHT_CLIENT_INFO",
            "RIGHT_CLIENT_SETTINGS_BASIC",
            "RIGHT_CLIENT_SETTINGS_COLLABORATORS",
            "RIGHT_CLIENT_DELETE",
        }
    ),
}


def implied(rights: Iterable[str]) -> frozenset[str]:
    """``rights`` plus what each implies, one level deep exactly as ``Rights.Implied``."""
    out: set[str] = set()
    for right in rights:
        out.add(right)
        out |= _IMPLIED.get(right, frozenset())
    return frozenset(out)


def missing_rights(granted: Iterable[str], needed: Iterable[str]) -> list[str]:
    """The ``needed`` rights that ``granted`` (expanded) lacks, sorted; ``[]`` when none."""
    have = implied(granted)
    return sorted(set(needed) - have)


def needed_for(*, downlinks: bool) -> frozenset[str]:
    """What a stream's key needs: reading traffic, and pushing downlinks when they are on."""
    return STREAM_TRAFFIC | (DOWNLINKS if downlinks else frozenset())


def describe_missing(missing: Iterable[str], application_id: str) -> str:
    """``the key lacks X on app: <consequence>; ...`` for a check line or a health text."""
    parts = [
        f"{right} ({CONSOLE_LABELS[right]!r}): {CONSEQUENCES[right]}"
        if right in CONSEQUENCES
        else right
        for right in missing
    ]
    return f"the key lacks rights on {application_id}: " + "; ".join(parts)


def application_rights(granted: Iterable[str]) -> list[str]:
    """What ``ListRights`` on an application answers for a key with ``granted``, sorted."""
    return sorted(implied(granted) & APPLICATION_RIGHTS)


def visibility_rights(event: Mapping[str, Any]) -> list[str]:
    """``event.visibility.rights`` (``[]`` when absent)."""
    visibility = event.get("visibility")
    rights = visibility.get("rights") if isinstance(visibility, Mapping) else None
    return [str(r) for r in rights] if isinstance(rights, list) else []


def event_visible(
    event: Mapping[str, Any], rights_on_application: Mapping[str, frozenset[str]]
) -> bool:
    """``EventIsVisible`` for a caller whose *implied* rights per application id are given
    (pass :func:`implied` of the granted rights; it is not recomputed per event).

    Visible when the event has no visibility, or when for any of its application or device
    identifiers the caller's implied rights on that application intersect the visibility.
    (Gateway, user, organization and client identifiers are never matched: the caller is
    assumed to hold rights on applications only.)
    """
    wanted = visibility_rights(event)
    if not wanted:
        return True
    for ids in event.get("identifiers") or ():
        if not isinstance(ids, Mapping):
            continue
        app_ids = ids.get("application_ids")
        if app_ids is None and isinstance(ids.get("device_ids"), Mapping):
            app_ids = ids["device_ids"].get("application_ids")
        if not isinstance(app_ids, Mapping):
            continue
        granted = rights_on_application.get(str(app_ids.get("application_id", "")))
        if granted and not granted.isdisjoint(wanted):
            return True
    return False


def rights_url(base_url: str, application_id: str) -> str:
    return f"{base_url.rstrip('/')}/api/v3/applications/{application_id}/rights"


def parse_rights(body: bytes) -> frozenset[str]:
    """The rights in a ``ListRights`` answer (``{}`` means none)."""
    try:
        doc = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError as exc:
        raise RequestRejected(f"rights answer is not JSON: {exc}") from exc
    rights = doc.get("rights", []) if isinstance(doc, dict) else None
    if not isinstance(rights, list) or not all(isinstance(r, str) for r in rights):
        raise RequestRejected(f"rights answer has no list of rights: {body[:200]!r}")
    return frozenset(rights)


async def fetch_rights(
    client: httpx.AsyncClient, base_url: str, api_key: str, application_id: str
) -> frozenset[str]:
    """The rights ``api_key`` has on ``application_id``, as TTS lists them (implied already).

    Raises ``AuthRejected`` (401/403), ``RateLimited``, ``ServerUnavailable`` or
    ``RequestRejected`` for a non-200 answer, ``StreamDisconnected`` for a transport failure.
    """
    with tts.map_transport_errors():
        response = await client.get(
            rights_url(base_url, application_id), headers=tts.headers(api_key)
        )
    if response.status_code != 200:
        raise tts.error_for_response(response, response.content)
    return parse_rights(response.content)
