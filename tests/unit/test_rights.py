"""Rights as TTS expands and checks them (lorawan-stack pkg/ttnpb/rights.go, rightsutil)."""

from __future__ import annotations

from ingestd import rights
from ingestd.rights import (
    DOWNLINKS,
    STREAM_TRAFFIC,
    TRAFFIC_DOWN_WRITE,
    TRAFFIC_READ,
    application_rights,
    event_visible,
    implied,
    missing_rights,
    parse_rights,
)


def test_the_enum_is_rights_proto_without_right_invalid() -> None:
    assert len(rights.ALL_RIGHTS) == 63 == len(set(rights.ALL_RIGHTS))
    assert rights.ALL_RIGHTS[0] == "RIGHT_USER_INFO" and rights.ALL_RIGHTS[-1] == "RIGHT_ALL"
    assert len(rights.APPLICATION_RIGHTS) == 15  # INFO … TRAFFIC_DOWN_WRITE, LINK, ALL


def test_application_all_and_all_imply_traffic_rights() -> None:
    for granted in (["RIGHT_APPLICATION_ALL"], ["RIGHT_ALL"], ["RIGHT_APPLICATION_LINK"]):
        assert missing_rights(granted, STREAM_TRAFFIC | DOWNLINKS) == []
    assert implied(["RIGHT_APPLICATION_LINK"]) == {
        "RIGHT_APPLICATION_LINK",
        "RIGHT_APPLICATION_INFO",
        TRAFFIC_READ,
        TRAFFIC_DOWN_WRITE,
    }
    assert implied(["RIGHT_ALL"]) == set(rights.ALL_RIGHTS)


def test_implication_is_one_level_as_in_tts() -> None:
    # RIGHT_USER_ALL implies user rights only, never application ones.
    assert missing_rights(["RIGHT_USER_ALL"], STREAM_TRAFFIC) == [TRAFFIC_READ]
    assert implied(["RIGHT_APPLICATION_INFO"]) == {"RIGHT_APPLICATION_INFO"}


def test_missing_rights_names_each_missing_right_sorted() -> None:
    assert missing_rights(["RIGHT_APPLICATION_INFO"], STREAM_TRAFFIC | DOWNLINKS) == [
        TRAFFIC_DOWN_WRITE,
        TRAFFIC_READ,
    ]
    assert missing_rights([TRAFFIC_READ], DOWNLINKS) == [TRAFFIC_DOWN_WRITE]
    assert missing_rights([], []) == []


def test_list_rights_shows_application_rights_only() -> None:
    assert application_rights(["RIGHT_ALL"]) == sorted(rights.APPLICATION_RIGHTS)
    assert application_rights(["RIGHT_USER_ALL"]) == []
    assert parse_rights(b"{}") == frozenset()
    assert parse_rights(b'{"rights":["RIGHT_APPLICATION_INFO"]}') == {"RIGHT_APPLICATION_INFO"}


UPLINK = {
    "name": "as.up.data.forward",
    "identifiers": [
        {"device_ids": {"device_id": "d1", "application_ids": {"application_id": "app"}}}
    ],
    "visibility": {"rights": [TRAFFIC_READ]},
}


def test_event_visibility_intersects_the_callers_rights_on_the_events_application() -> None:
    assert event_visible(UPLINK, {"app": implied(["RIGHT_APPLICATION_ALL"])})
    assert not event_visible(UPLINK, {"app": implied(["RIGHT_APPLICATION_INFO"])})
    assert not event_visible(UPLINK, {"other-app": implied(["RIGHT_APPLICATION_ALL"])})
    assert event_visible({**UPLINK, "visibility": {}}, {})  # no visibility: anyone with access
    app_event = {
        "identifiers": [{"application_ids": {"application_id": "app"}}],
        "visibility": {"rights": ["RIGHT_APPLICATION_DEVICES_READ"]},
    }
    assert event_visible(app_event, {"app": implied(["RIGHT_APPLICATION_DEVICES_READ"])})
    assert not event_visible(app_event, {"app": implied([TRAFFIC_READ])})


def test_visibility_right_all_is_not_implied_by_application_all() -> None:
    """A definition without options gets visibility RIGHT_ALL; visibility is not expanded."""
    event = {**UPLINK, "visibility": {"rights": ["RIGHT_ALL"]}}
    assert not event_visible(event, {"app": implied(["RIGHT_APPLICATION_ALL"])})
    assert event_visible(event, {"app": implied(["RIGHT_ALL"])})
