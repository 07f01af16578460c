"""Normalization of recorded TTS events into rows, compared with rows written out by hand.

The events in ``tests/data/events/`` follow TTS_WIRE (key order, quoted uint64s, omitted
zero values). Expected rows below are spelled out literally, never computed by the code
under test.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingestd import schema
from ingestd.errors import MalformedEvent
from ingestd.models import Row
from ingestd.normalize import (
    event_row,
    normalize,
    parse_duration_s,
    parse_time,
)
from ingestd.outbox.ids import OUTBOX_CID_PREFIX, outbox_correlation_id, outbox_id_from

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "events"
STREAM = "app:acme-water-meters"
APP = "acme-water-meters"


def load(stem: str) -> dict[str, Any]:
    return orjson.loads((DATA_DIR / f"{stem}.json").read_bytes())  # type: ignore[no-any-return]


def t(hour: int, minute: int, second: int, microsecond: int = 0) -> datetime:
    """A time on 2024-10-30 (the day all recorded events happened), UTC."""
    return datetime(2024, 10, 30, hour, minute, second, microsecond, tzinfo=UTC)


# --- correlation id lists shared by several events -------------------------------------

UP_2GW_CIDS = [
    "gs:uplink:01JBEBB4PPGSGH3Z3RFAHEC5H2",
    "rpc:/ttn.lorawan.v3.GsNs/HandleUplink:01JBEBB4PQVVTVY4DDX4KR30FD",
    "rpc:/ttn.lorawan.v3.NsAs/HandleUplink:01JBEBB4XBJ03P9RKHM7MKQZRY",
]
PUSH_CTX_CIDS = [  # the AS request context of the push of outbox row 7
    "as:downlink:01JBEF3Q2R4S6T8V0W2X4Y6Z8A",
    "rpc:/ttn.lorawan.v3.AppAs/DownlinkQueuePush:01JBEF3Q1N9P1Q3R5S7T9V1W3X",
]
OUTBOX_7_CIDS = [
    "as:downlink:01JBEF3Q2R4S6T8V0W2X4Y6Z8A",
    "ingestd:outbox:7",
    "rpc:/ttn.lorawan.v3.AppAs/DownlinkQueuePush:01JBEF3Q1N9P1Q3R5S7T9V1W3X",
]
SET_INTERVAL = {"command": "set_interval", "interval_minutes": 15}


# --- expected derived rows, one param per recorded event --------------------------------

NORMALIZED = [
    pytest.param(
        "uplink_lora_2gw",
        [
            Row(
                "uplinks",
                {
                    "uplink_id": "c5061eb22563d353a59f6562ba71eb32",
                    "event_unique_id": "01JBEBB4XXR5XFFNF94PCHW6BX",
                    "application_id": APP,
                    "device_id": "wm-0001",
                    "dev_eui": "70B3D57ED005A1F2",
                    "join_eui": "70B3D57ED0000000",
                    "dev_addr": "260B4A7C",
                    "session_key_id": "AZLcO108b/O8hX5J9kmkOg==",
                    "f_port": 2,
                    "f_cnt": 1842,
                    "frm_payload": b"\x01\x00\x01\xe2\x40\x0e\x10",
                    "decoded_payload": {
                        "battery_mv": 3600,
                        "leak_detected": False,
                        "volume_liters": 123456,
                    },
                    "confirmed": False,
                    "received_at": t(9, 15, 40, 118402),  # NS time, ns cut
                    "rssi": -87,
                    "snr": 9.25,
                    "gateway_count": 2,
                    "frequency": 868_500_000,
                    "modulation": "lora",
                    "spreading_factor": 7,
                    "bandwidth": 125_000,
                    "coding_rate": "4/5",
                    "bit_rate": None,
                    "consumed_airtime_s": 0.061696,
                    "packet_error_rate": 0.0123,
                    "source": "stream",
                    "simulated": False,
                },
            ),
            Row(
                "uplink_receptions",
                {
                    "uplink_id": "c5061eb22563d353a59f6562ba71eb32",
                    "received_at": t(9, 15, 40, 118402),
                    "reception_index": 0,
                    "gateway_id": "acme-gw-rooftop-01",
                    "gateway_eui": "B827EBFFFE61A2C3",
                    "rssi": -87,
                    "channel_rssi": -87,
                    "snr": 9.25,
                    "time": t(9, 15, 40, 91337),
                    "channel_index": 2,
                    "latitude": 52.37403,
                    "longitude": 4.88969,
                    "altitude": 32,
                    "source": "stream",
                },
            ),
            Row(
                "uplink_receptions",
                {
                    "uplink_id": "c5061eb22563d353a59f6562ba71eb32",
                    "received_at": t(9, 15, 40, 118402),
                    "reception_index": 1,
                    "gateway_id": "acme-gw-depot-02",
                    "gateway_eui": "7276FF00390301AB",
                    "rssi": -112,
                    "channel_rssi": -112,
                    "snr": -3.5,
                    "time": t(9, 15, 40, 91341),
                    "channel_index": 2,
                    "latitude": None,
                    "longitude": None,
                    "altitude": None,
                    "source": "stream",
                },
            ),
        ],
        id="uplink_lora_2gw",
    ),
    pytest.param(
        "uplink_fsk",
        [
            Row(
                "uplinks",
                {
                    "uplink_id": "59064bde754510c564aba77e9a2ca180",
                    "event_unique_id": "01JBECF2TZ0M3G7K9Q2R4S6T8V",
                    "application_id": APP,
                    "device_id": "fsk-logger-07",
                    "dev_eui": "0004A30B001C9A3E",
                    "join_eui": "0004A30B00000001",
                    "dev_addr": "260B91D0",
                    "session_key_id": "AZLdSg4aT2m1j3o9P0ZzKw==",
                    "f_port": 5,
                    "f_cnt": 311,
                    "frm_payload": b"\x0b\x0f\x00\x00\x02\x76\x11",
                    "decoded_payload": None,
                    "confirmed": False,
                    "received_at": t(9, 31, 2, 631072),
                    "rssi": -95,
                    "snr": None,  # FSK has no SNR: absent means unknown, not 0
                    "gateway_count": 1,
                    "frequency": 868_800_000,
                    "modulation": "fsk",
                    "spreading_factor": None,
                    "bandwidth": None,
                    "coding_rate": None,
                    "bit_rate": 50_000,
                    "consumed_airtime_s": 0.00496,
                    "packet_error_rate": None,
                    "source": "stream",
                    "simulated": False,
                },
            ),
            Row(
                "uplink_receptions",
                {
                    "uplink_id": "59064bde754510c564aba77e9a2ca180",
                    "received_at": t(9, 31, 2, 631072),
                    "reception_index": 0,
                    "gateway_id": "acme-gw-rooftop-01",
                    "gateway_eui": "B827EBFFFE61A2C3",
                    "rssi": -95,
                    "channel_rssi": -95,
                    "snr": None,
                    "time": t(9, 31, 2, 604118),
                    "channel_index": 8,
                    "latitude": 52.37403,
                    "longitude": 4.88969,
                    "altitude": 32,
                    "source": "stream",
                },
            ),
        ],
        id="uplink_fsk",
    ),
    pytest.param(
        "uplink_omitted_zeros",
        [
            Row(
                "uplinks",
                {
                    "uplink_id": "ccbf2c8d0588c116abe23404c935b2b4",
                    "event_unique_id": "01JBED0VBN6P8Q0R2S4T6V8W0X",
                    "application_id": APP,
                    "device_id": "wm-0003",
                    "dev_eui": "70B3D57ED005A1F4",
                    "join_eui": "70B3D57ED0000000",
                    "dev_addr": "260B6E21",
                    "session_key_id": "AZLd3qQ2Rk6wQzY8lE1b9g==",
                    "f_port": 1,
                    "f_cnt": 0,  # absent f_cnt = 0
                    "frm_payload": b"\x00\x00\x00\x00",
                    "decoded_payload": None,
                    "confirmed": False,  # absent
                    "received_at": t(9, 40, 17, 541893),
                    # Best rssi comes from depot-02 (-104), best snr from harbour-03 (1.5):
                    # each is the maximum over all gateways, taken independently.
                    "rssi": -104,
                    "snr": 1.5,
                    "gateway_count": 2,
                    "frequency": 868_100_000,
                    "modulation": "lora",
                    "spreading_factor": 9,
                    "bandwidth": 125_000,
                    "coding_rate": "4/5",
                    "bit_rate": None,
                    "consumed_airtime_s": 0.185344,
                    "packet_error_rate": None,
                    "source": "stream",
                    "simulated": False,
                },
            ),
            Row(
                "uplink_receptions",
                {
                    "uplink_id": "ccbf2c8d0588c116abe23404c935b2b4",
                    "received_at": t(9, 40, 17, 541893),
                    "reception_index": 0,
                    "gateway_id": "acme-gw-depot-02",
                    "gateway_eui": "7276FF00390301AB",
                    "rssi": -104,
                    "channel_rssi": -104,
                    "snr": 0.0,  # LoRa gateway without "snr": TTS omitted a 0 dB SNR
                    "time": t(9, 40, 17, 512004),
                    "channel_index": 0,  # absent: channel 0
                    "latitude": None,
                    "longitude": None,
                    "altitude": None,
                    "source": "stream",
                },
            ),
            Row(
                "uplink_receptions",
                {
                    "uplink_id": "ccbf2c8d0588c116abe23404c935b2b4",
                    "received_at": t(9, 40, 17, 541893),
                    "reception_index": 1,
                    "gateway_id": "acme-gw-harbour-03",
                    "gateway_eui": "A840411D4E1C4150",
                    "rssi": -118,
                    "channel_rssi": -119,
                    "snr": 1.5,
                    "time": t(9, 40, 17, 512011),
                    "channel_index": 0,
                    "latitude": None,
                    "longitude": None,
                    "altitude": None,
                    "source": "stream",
                },
            ),
        ],
        id="uplink_omitted_zeros",
    ),
    pytest.param(
        "uplink_confirmed_1gw",
        [
            Row(
                "uplinks",
                {
                    "uplink_id": "ae13c564d25c73ebfeef96fe04aa917d",
                    "event_unique_id": "01JBEDA3N7B9C1D3E5F7G9H1J3",
                    "application_id": APP,
                    "device_id": "wm-abp-0009",
                    "dev_eui": "70B3D57ED005A1F9",
                    "join_eui": None,  # ABP device: no JoinEUI anywhere
                    "dev_addr": "260B11AA",
                    "session_key_id": "AZLeB5n0QF2Cq1x8Jm7R3A==",
                    "f_port": 3,
                    "f_cnt": 77,
                    "frm_payload": b"\x01\x12\x00\x00",
                    "decoded_payload": {"alarm": "tamper", "code": 18},
                    "confirmed": True,
                    "received_at": t(9, 50, 21, 34112),
                    "rssi": -71,
                    "snr": 11,
                    "gateway_count": 1,
                    "frequency": 867_500_000,
                    "modulation": "lora",
                    "spreading_factor": 7,
                    "bandwidth": 125_000,
                    "coding_rate": "4/5",
                    "bit_rate": None,
                    "consumed_airtime_s": 0.056576,
                    "packet_error_rate": None,
                    "source": "stream",
                    "simulated": False,
                },
            ),
            Row(
                "uplink_receptions",
                {
                    "uplink_id": "ae13c564d25c73ebfeef96fe04aa917d",
                    "received_at": t(9, 50, 21, 34112),
                    "reception_index": 0,
                    "gateway_id": "acme-gw-depot-02",
                    "gateway_eui": "7276FF00390301AB",
                    "rssi": -71,
                    "channel_rssi": -71,
                    "snr": 11,
                    "time": t(9, 50, 21, 4000),
                    "channel_index": 5,
                    "latitude": None,
                    "longitude": None,
                    "altitude": None,
                    "source": "stream",
                },
            ),
        ],
        id="uplink_confirmed_1gw",
    ),
    pytest.param(
        "uplink_lrfhss",
        [
            Row(
                "uplinks",
                {
                    "uplink_id": "2dac8f7ad3f6c219a1e2debbd9c0e90b",
                    "event_unique_id": "01JBEDK2WJ4K6M8N0P2Q4R6S8T",
                    "application_id": APP,
                    "device_id": "lr-tracker-02",
                    "dev_eui": "70B3D57ED006C0DE",
                    "join_eui": "70B3D57ED0000000",
                    "dev_addr": "260BA0F2",
                    "session_key_id": "AZLeR1uVQ3iZ8c2K6tq0Hw==",
                    "f_port": 4,
                    "f_cnt": 9,
                    "frm_payload": b"\x12\x34\x56\x78",
                    "decoded_payload": None,
                    "confirmed": False,
                    "received_at": t(9, 59, 58, 330274),
                    "rssi": -121,
                    "snr": -8.5,
                    "gateway_count": 1,
                    "frequency": 868_130_000,
                    "modulation": "lrfhss",
                    "spreading_factor": None,
                    "bandwidth": 137_000,  # the operating channel width
                    "coding_rate": "1/3",
                    "bit_rate": None,
                    "consumed_airtime_s": 2.113536,
                    "packet_error_rate": None,
                    "source": "stream",
                    "simulated": False,
                },
            ),
            Row(
                "uplink_receptions",
                {
                    "uplink_id": "2dac8f7ad3f6c219a1e2debbd9c0e90b",
                    "received_at": t(9, 59, 58, 330274),
                    "reception_index": 0,
                    "gateway_id": "acme-gw-rooftop-01",
                    "gateway_eui": "B827EBFFFE61A2C3",
                    "rssi": -121,
                    "channel_rssi": -121,
                    "snr": -8.5,
                    "time": t(9, 59, 58, 300126),
                    "channel_index": 0,
                    "latitude": 52.37403,
                    "longitude": 4.88969,
                    "altitude": 32,
                    "source": "stream",
                },
            ),
        ],
        id="uplink_lrfhss",
    ),
    pytest.param(
        "join_forward",
        [
            Row(
                "joins",
                {
                    "event_unique_id": "01JBEE1AGS3T5V7W9X1Y3Z5A7B",
                    "application_id": APP,
                    "device_id": "wm-0004",
                    "dev_eui": "70B3D57ED005A1F5",
                    "join_eui": "70B3D57ED0000000",
                    "dev_addr": "260B3C9D",
                    "session_key_id": "AZLfE2hUQWe4zv9kGm6b1A==",
                    "received_at": t(10, 8, 44, 202617),  # join_accept.received_at (NS)
                    "source": "stream",
                },
            ),
        ],
        id="join_forward",
    ),
    pytest.param(
        "down_receive",
        [
            Row(
                "downlink_events",
                {
                    "event_unique_id": "01JBEF3Q3B5C7D9E1F3G5H7J9K",
                    "kind": "receive",
                    "application_id": APP,
                    "device_id": "wm-0001",
                    "f_port": 10,
                    "f_cnt": None,  # not assigned yet when the AS receives the push
                    "frm_payload": b"\x01\x0f",
                    "decoded_payload": SET_INTERVAL,
                    "confirmed": True,
                    "priority": "NORMAL",
                    # ingestd:outbox:7 is only in data.correlation_ids for receive
                    "correlation_ids": OUTBOX_7_CIDS,
                    "outbox_id": 7,
                    "error": None,
                    "time": t(10, 20, 3, 118532),
                    "source": "stream",
                },
            ),
        ],
        id="down_receive",
    ),
    pytest.param(
        "down_forward",
        [
            Row(
                "downlink_events",
                {
                    "event_unique_id": "01JBEF3Q4M6N8P0Q2R4S6T8V0W",
                    "kind": "forward",
                    "application_id": APP,
                    "device_id": "wm-0001",
                    "f_port": 10,
                    "f_cnt": 42,
                    "frm_payload": b"\xc7\x75",
                    "decoded_payload": None,  # encrypted, not decoded
                    "confirmed": True,
                    "priority": "NORMAL",
                    "correlation_ids": OUTBOX_7_CIDS,
                    "outbox_id": 7,
                    "error": None,
                    "time": t(10, 20, 3, 164019),
                    "source": "stream",
                },
            ),
        ],
        id="down_forward",
    ),
    pytest.param(
        "down_sent",
        [
            Row(
                "downlink_events",
                {
                    "event_unique_id": "01JBEF5DC8M0N2P4Q6R8S0T2V4",
                    "kind": "sent",
                    "application_id": APP,
                    "device_id": "wm-0001",
                    "f_port": 10,
                    "f_cnt": 42,
                    "frm_payload": b"\x01\x0f",
                    "decoded_payload": SET_INTERVAL,
                    "confirmed": True,
                    "priority": "NORMAL",
                    "correlation_ids": [
                        "as:downlink:01JBEF3Q2R4S6T8V0W2X4Y6Z8A",
                        "gs:tx_ack:01JBEF5D8E0F2G4H6J8K0M2N4P",
                        "gs:uplink:01JBEF5B0C2D4E6F8G0H2J4K6M",
                        "ingestd:outbox:7",
                        "ns:transmission:01JBEF5B7N9P1Q3R5S7T9V1W3X",
                        "rpc:/ttn.lorawan.v3.AppAs/DownlinkQueuePush:01JBEF3Q1N9P1Q3R5S7T9V1W3X",
                        "rpc:/ttn.lorawan.v3.GsNs/HandleUplink:01JBEF5B0DX2Y4Z6A8B0C2D4E6",
                        "rpc:/ttn.lorawan.v3.GsNs/ReportTxAcknowledgment:01JBEF5D8FQ2R4S6T8V0W2X4Y6",
                        "rpc:/ttn.lorawan.v3.NsAs/HandleUplink:01JBEF5DB1A3B5C7D9E1F3G5H7",
                        "rpc:/ttn.lorawan.v3.NsGs/ScheduleDownlink:01JBEF5B7PG8H0J2K4M6N8P0Q2",
                    ],
                    "outbox_id": 7,
                    "error": None,
                    "time": t(10, 21, 40, 287003),
                    "source": "stream",
                },
            ),
        ],
        id="down_sent",
    ),
    pytest.param(
        "down_ack",
        [
            Row(
                "downlink_events",
                {
                    "event_unique_id": "01JBEF9WA4B6C8D0E2F4G6H8J0",
                    "kind": "ack",
                    "application_id": APP,
                    "device_id": "wm-0001",
                    "f_port": 10,
                    "f_cnt": 42,
                    "frm_payload": b"\x01\x0f",
                    "decoded_payload": SET_INTERVAL,
                    "confirmed": True,
                    "priority": "NORMAL",
                    "correlation_ids": [
                        "as:downlink:01JBEF3Q2R4S6T8V0W2X4Y6Z8A",
                        "gs:uplink:01JBEF9W2X4Y6Z8A0B2C4D6E8F",
                        "ingestd:outbox:7",
                        "rpc:/ttn.lorawan.v3.AppAs/DownlinkQueuePush:01JBEF3Q1N9P1Q3R5S7T9V1W3X",
                        "rpc:/ttn.lorawan.v3.GsNs/HandleUplink:01JBEF9W2YG0H2J4K6M8N0P2Q4",
                        "rpc:/ttn.lorawan.v3.NsAs/HandleUplink:01JBEF9W8RZ1A3B5C7D9E1F3G5",
                    ],
                    "outbox_id": 7,
                    "error": None,
                    "time": t(10, 24, 9, 551874),
                    "source": "stream",
                },
            ),
        ],
        id="down_ack",
    ),
    pytest.param(
        "down_nack",
        [
            Row(
                "downlink_events",
                {
                    "event_unique_id": "01JBEFD7M8H0J2K4M6N8P0Q2R4",
                    "kind": "nack",
                    "application_id": APP,
                    "device_id": "wm-0001",
                    "f_port": 11,
                    "f_cnt": 43,
                    "frm_payload": b"\x02",
                    "decoded_payload": {"command": "reset_counter"},
                    "confirmed": True,
                    "priority": "HIGH",
                    "correlation_ids": [
                        "as:downlink:01JBEFC1T3V5W7X9Y1Z3A5B7C9",
                        "gs:uplink:01JBEFD7E9F1G3H5J7K9M1N3P5",
                        "ingestd:outbox:8",
                        "rpc:/ttn.lorawan.v3.AppAs/DownlinkQueuePush:01JBEFC1S8R0S2T4V6W8X0Y2Z4",
                        "rpc:/ttn.lorawan.v3.GsNs/HandleUplink:01JBEFD7EAQ7R9S1T3V5W7X9Y1",
                        "rpc:/ttn.lorawan.v3.NsAs/HandleUplink:01JBEFD7K2Z4A6B8C0D2E4F6G8",
                    ],
                    "outbox_id": 8,
                    "error": None,
                    "time": t(10, 27, 31, 740558),
                    "source": "stream",
                },
            ),
        ],
        id="down_nack",
    ),
    pytest.param(
        "down_failed",
        [
            Row(
                "downlink_events",
                {
                    "event_unique_id": "01JBEFJ6R6S8T0V2W4X6Y8Z0A2",
                    "kind": "failed",
                    "application_id": APP,
                    "device_id": "wm-0001",
                    "f_port": 12,
                    "f_cnt": 44,
                    "frm_payload": bytes(60),
                    "decoded_payload": None,
                    "confirmed": False,  # absent
                    "priority": "NORMAL",
                    "correlation_ids": [
                        "as:downlink:01JBEFH2A4B6C8D0E2F4G6H8J0",
                        "ingestd:outbox:9",
                        "rpc:/ttn.lorawan.v3.AppAs/DownlinkQueuePush:01JBEFH29X1Y3Z5A7B9C1D3E5F",
                        "rpc:/ttn.lorawan.v3.NsAs/HandleUplink:01JBEFJ6P8Q0R2S4T6V8W0X2Y4",
                    ],
                    "outbox_id": 9,
                    "error": {
                        "namespace": "pkg/networkserver",
                        "name": "application_downlink_too_long",
                        "message_format": "application downlink payload length `{length}` exceeds maximum `{max}`",
                        "attributes": {"length": 60, "max": 51},
                        "correlation_id": "7c7a2b3a0e5f4bd6a3f0c6c1e8d2b9a4",
                        "code": 3,
                    },
                    "time": t(10, 31, 12, 406331),
                    "source": "stream",
                },
            ),
        ],
        id="down_failed",
    ),
    pytest.param(
        "down_queue_invalidated",
        [
            Row(
                "downlink_events",
                {
                    "event_unique_id": "01JBEFT0D9E1F3G5H7J9K1M3N5",
                    "kind": "queue_invalidated",
                    "application_id": APP,
                    "device_id": "wm-0001",
                    # payload of the first invalidated item ...
                    "f_port": 10,
                    "f_cnt": 45,
                    "frm_payload": b"\xf1\x95",
                    "decoded_payload": None,
                    "confirmed": True,
                    "priority": "NORMAL",
                    # ... correlation ids of both, so outbox rows 10 and 11 can be found
                    "correlation_ids": [
                        "as:downlink:01JBEFP4B6C8D0E2F4G6H8J0K2",
                        "as:downlink:01JBEFP4B7W9X1Y3Z5A7B9C1D3",
                        "ingestd:outbox:10",
                        "ingestd:outbox:11",
                        "rpc:/ttn.lorawan.v3.AppAs/DownlinkQueuePush:01JBEFP4A1M3N5P7Q9R1S3T5V7",
                        "rpc:/ttn.lorawan.v3.NsAs/HandleUplink:01JBEFT0C2D4E6F8G0H2J4K6M8",
                    ],
                    "outbox_id": 10,
                    "error": None,
                    "time": t(10, 35, 50, 9841),
                    "source": "stream",
                },
            ),
        ],
        id="down_queue_invalidated",
    ),
    pytest.param(
        "down_drop",
        [
            Row(
                "downlink_events",
                {
                    "event_unique_id": "01JBEFX8Z3A5B7C9D1E3F5G7H9",
                    "kind": "drop",
                    "application_id": APP,
                    "device_id": "wm-0002",
                    "f_port": None,
                    "f_cnt": None,
                    "frm_payload": None,
                    "decoded_payload": None,
                    "confirmed": None,
                    "priority": None,
                    "correlation_ids": [
                        "as:downlink:01JBEFX8Y0Z2A4B6C8D0E2F4G6",
                        "rpc:/ttn.lorawan.v3.AppAs/DownlinkQueuePush:01JBEFX8X5H7J9K1M3N5P7Q9R1",
                    ],
                    "outbox_id": None,  # TTS puts no client ids on drop events
                    "error": {
                        "@type": "type.googleapis.com/ttn.lorawan.v3.ErrorDetails",
                        "namespace": "pkg/applicationserver",
                        "name": "no_device_session",
                        "message_format": "no device session",
                        "correlation_id": "0d4b9e1f7a2c4e8b9f3a6c5d2e1b7a90",
                        "code": 9,
                    },
                    "time": t(10, 38, 26, 772095),
                    "source": "stream",
                },
            ),
        ],
        id="down_drop",
    ),
    pytest.param("uplink_sparse_replay", [], id="uplink_sparse_replay"),
    pytest.param("ns_up_data_process", [], id="ns_up_data_process"),
    pytest.param("stream_start", [], id="stream_start"),
]


@pytest.mark.parametrize(("stem", "expected"), NORMALIZED)
def test_normalize_gives_the_expected_rows(stem: str, expected: list[Row]) -> None:
    assert normalize(load(stem)) == expected


@pytest.mark.parametrize(("stem", "expected"), NORMALIZED)
def test_rows_carry_exactly_the_schema_columns(stem: str, expected: list[Row]) -> None:
    """Every derived row fills every column of its table, no more (the store inserts as-is)."""
    for row in normalize(load(stem)):
        assert set(row.values) == set(schema.metadata.tables[row.table].columns.keys())


@pytest.mark.parametrize(("stem", "expected"), NORMALIZED)
def test_normalize_does_not_modify_the_event(stem: str, expected: list[Row]) -> None:
    event = load(stem)
    before = copy.deepcopy(event)
    normalize(event)
    event_row(event, stream=STREAM)
    assert event == before


def test_every_recorded_event_has_expected_rows() -> None:
    """A new file in tests/data/events must come with its expected rows here."""
    stems = {path.stem for path in DATA_DIR.glob("*.json")}
    assert stems == {param.id for param in NORMALIZED}


# --- the events table ------------------------------------------------------------------

EVENT_ROWS = [
    pytest.param(
        "uplink_lora_2gw",
        {
            "unique_id": "01JBEBB4XXR5XFFNF94PCHW6BX",
            "name": "as.up.data.forward",
            "time": t(9, 15, 40, 349611),
            "application_id": APP,
            "device_id": "wm-0001",
            "dev_eui": "70B3D57ED005A1F2",
            "correlation_ids": UP_2GW_CIDS,
        },
        id="uplink_lora_2gw",
    ),
    pytest.param(
        "down_receive",
        {
            "unique_id": "01JBEF3Q3B5C7D9E1F3G5H7J9K",
            "name": "as.down.data.receive",
            "time": t(10, 20, 3, 118532),
            "application_id": APP,
            "device_id": "wm-0001",
            "dev_eui": None,  # push requests name the device by id only
            "correlation_ids": PUSH_CTX_CIDS,  # the event's own ids, not the item's
        },
        id="down_receive",
    ),
    pytest.param(
        "uplink_sparse_replay",
        {
            "unique_id": "01JBE73F8M0N2P4Q6R8S0T2V4W",
            "name": "as.up.data.forward",
            "time": t(8, 2, 11, 540018),
            "application_id": APP,
            "device_id": None,
            "dev_eui": None,
            "correlation_ids": None,
        },
        id="uplink_sparse_replay",
    ),
    pytest.param(
        "ns_up_data_process",
        {
            "unique_id": "01JBEBB4WQ2R4S6T8V0W2X4Y6Z",
            "name": "ns.up.data.process",
            "time": t(9, 15, 40, 322017),
            "application_id": APP,
            "device_id": "wm-0001",
            "dev_eui": "70B3D57ED005A1F2",
            "correlation_ids": UP_2GW_CIDS[:2],
        },
        id="ns_up_data_process",
    ),
    pytest.param(
        "stream_start",
        {
            "unique_id": "01JBE70A0C8M0N2P4Q6R8S0T2V",
            "name": "events.stream.start",
            "time": t(8, 0, 0, 412853),
            "application_id": APP,
            "device_id": None,
            "dev_eui": None,
            "correlation_ids": ["rpc:/ttn.lorawan.v3.Events/Stream:01JBE70A0B2C4D6E8F0G2H4J6K"],
        },
        id="stream_start",
    ),
    pytest.param(
        "down_drop",
        {
            "unique_id": "01JBEFX8Z3A5B7C9D1E3F5G7H9",
            "name": "as.down.data.drop",
            "time": t(10, 38, 26, 772095),
            "application_id": APP,
            "device_id": "wm-0002",
            "dev_eui": None,
            "correlation_ids": [
                "as:downlink:01JBEFX8Y0Z2A4B6C8D0E2F4G6",
                "rpc:/ttn.lorawan.v3.AppAs/DownlinkQueuePush:01JBEFX8X5H7J9K1M3N5P7Q9R1",
            ],
        },
        id="down_drop",
    ),
]


@pytest.mark.parametrize(("stem", "expected"), EVENT_ROWS)
def test_event_row_keeps_identity_ids_and_raw_payload(stem: str, expected: dict[str, Any]) -> None:
    event = load(stem)
    row = event_row(event, stream=STREAM)
    assert row["data"] is event.get("data")  # stored as received, not copied
    assert {k: v for k, v in row.items() if k != "data"} == {"stream": STREAM, **expected}


def test_event_row_fills_every_events_column_but_the_db_default() -> None:
    row = event_row(load("uplink_fsk"), stream=STREAM)
    assert set(row) == set(schema.events.columns.keys()) - {"ingested_at"}


def test_event_row_of_a_sparse_replay_has_no_data() -> None:
    assert event_row(load("uplink_sparse_replay"), stream=STREAM)["data"] is None


# --- fallbacks and defaults not covered by the recorded files ---------------------------


def test_uplink_received_at_falls_back_to_as_time_then_event_time() -> None:
    event = load("uplink_lora_2gw")
    del event["data"]["uplink_message"]["received_at"]
    assert normalize(event)[0].values["received_at"] == t(9, 15, 40, 331806)
    del event["data"]["received_at"]
    assert normalize(event)[0].values["received_at"] == t(9, 15, 40, 349611)


def test_join_received_at_falls_back_to_as_time() -> None:
    event = load("join_forward")
    del event["data"]["join_accept"]["received_at"]
    assert normalize(event)[0].values["received_at"] == t(10, 8, 44, 899812)


def test_uplink_device_ids_fall_back_to_the_event_identifiers() -> None:
    event = load("uplink_lora_2gw")
    event["data"]["end_device_ids"] = {
        "device_id": "wm-0001",
        "application_ids": {"application_id": APP},
    }
    values = normalize(event)[0].values
    assert (values["dev_eui"], values["join_eui"], values["dev_addr"]) == (
        "70B3D57ED005A1F2",
        "70B3D57ED0000000",
        "260B4A7C",
    )
    del event["data"]["end_device_ids"]
    values = normalize(event)[0].values
    assert [values[k] for k in ("application_id", "device_id", "dev_eui", "dev_addr")] == [
        APP,
        "wm-0001",
        "70B3D57ED005A1F2",
        "260B4A7C",
    ]


def test_uplink_without_gateways_has_no_signal_and_no_receptions() -> None:
    event = load("uplink_lora_2gw")
    del event["data"]["uplink_message"]["rx_metadata"]
    rows = normalize(event)
    assert [row.table for row in rows] == ["uplinks"]
    assert (rows[0].values["gateway_count"], rows[0].values["rssi"], rows[0].values["snr"]) == (
        0,
        None,
        None,
    )


def test_uplink_without_payload_or_settings_reads_defaults() -> None:
    event = load("uplink_confirmed_1gw")
    up = event["data"]["uplink_message"]
    for key in ("frm_payload", "f_port", "settings", "consumed_airtime", "session_key_id"):
        del up[key]
    values = normalize(event)[0].values
    assert values["frm_payload"] == b""
    assert values["f_port"] == 0
    assert values["session_key_id"] is None
    assert values["consumed_airtime_s"] is None
    assert [
        values[k]
        for k in (
            "frequency",
            "modulation",
            "spreading_factor",
            "bandwidth",
            "coding_rate",
            "bit_rate",
        )
    ] == [None] * 6


def test_downlink_omitted_priority_is_lowest_and_omitted_f_cnt_is_zero_once_queued() -> None:
    receive, forward = load("down_receive"), load("down_forward")
    for event in (receive, forward):
        del event["data"]["priority"]
        del event["data"]["confirmed"]
    del forward["data"]["f_cnt"]
    received, forwarded = normalize(receive)[0].values, normalize(forward)[0].values
    assert (received["priority"], received["confirmed"], received["f_cnt"]) == (
        "LOWEST",
        False,
        None,
    )
    assert (forwarded["priority"], forwarded["confirmed"], forwarded["f_cnt"]) == (
        "LOWEST",
        False,
        0,
    )


def test_downlink_priority_given_as_enum_number_is_named() -> None:
    event = load("down_forward")
    event["data"]["priority"] = 5
    assert normalize(event)[0].values["priority"] == "HIGH"


def test_queue_invalidated_without_downlinks_keeps_the_event_ids_only() -> None:
    event = load("down_queue_invalidated")
    event["data"]["downlink_queue_invalidated"]["downlinks"] = []
    values = normalize(event)[0].values
    assert values["correlation_ids"] == [
        "rpc:/ttn.lorawan.v3.NsAs/HandleUplink:01JBEFT0C2D4E6F8G0H2J4K6M8"
    ]
    assert (values["outbox_id"], values["f_port"], values["frm_payload"]) == (None, None, None)


def test_downlink_without_event_level_correlation_ids_uses_the_item_ids() -> None:
    event = load("down_forward")
    del event["correlation_ids"]
    assert normalize(event)[0].values["correlation_ids"] == OUTBOX_7_CIDS


# --- malformed events --------------------------------------------------------------------


def _raises(event: Any, *fragments: str) -> None:
    with pytest.raises(MalformedEvent) as info:
        normalize(event)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_event_without_unique_id_is_rejected() -> None:
    event = load("uplink_lora_2gw")
    del event["unique_id"]
    with pytest.raises(MalformedEvent, match="unique_id"):
        event_row(event, stream=STREAM)
    _raises(event, "unique_id")


@pytest.mark.parametrize("bad", ["yesterday", "2024-10-30T09:15:40", "", 1730279740])
def test_event_with_a_bad_time_is_rejected(bad: Any) -> None:
    event = load("down_sent")
    event["time"] = bad
    with pytest.raises(MalformedEvent, match="01JBEF5DC8M0N2P4Q6R8S0T2V4: time"):
        event_row(event, stream=STREAM)
    _raises(event, "as.down.data.sent.forward 01JBEF5DC8M0N2P4Q6R8S0T2V4", "time")


def test_event_without_time_or_name_is_rejected_by_event_row() -> None:
    event = load("stream_start")
    del event["time"]
    with pytest.raises(MalformedEvent, match="has no time"):
        event_row(event, stream=STREAM)
    event = load("stream_start")
    del event["name"]
    with pytest.raises(MalformedEvent, match="name"):
        event_row(event, stream=STREAM)


@pytest.mark.parametrize("bad", [[{"name": "x"}], "as.up.data.forward", None, 42])
def test_event_that_is_not_an_object_is_rejected(bad: Any) -> None:
    with pytest.raises(MalformedEvent, match="not a JSON object"):
        event_row(bad, stream=STREAM)
    _raises(bad, "not a JSON object")


@pytest.mark.parametrize("bad", ["868.5MHz", "", "-868500000", 868.5, None])
def test_uplink_with_a_non_numeric_frequency_is_rejected(bad: Any) -> None:
    event = load("uplink_lora_2gw")
    event["data"]["uplink_message"]["settings"]["frequency"] = bad
    if bad is None:  # JSON null is an omitted field, not a bad one
        assert normalize(event)[0].values["frequency"] is None
        return
    _raises(event, "as.up.data.forward 01JBEBB4XXR5XFFNF94PCHW6BX", "settings.frequency")


def test_uplink_data_without_uplink_message_is_rejected() -> None:
    event = load("uplink_lora_2gw")
    del event["data"]["uplink_message"]
    _raises(event, "as.up.data.forward 01JBEBB4XXR5XFFNF94PCHW6BX", "no uplink_message")


def test_uplink_whose_rx_metadata_is_not_a_list_is_rejected() -> None:
    event = load("uplink_lora_2gw")
    event["data"]["uplink_message"]["rx_metadata"] = {"gateway_ids": {"gateway_id": "gw"}}
    _raises(event, "rx_metadata is not a list")


@pytest.mark.parametrize("bad", ["AQAB4kAOEA=", "AQ!B4kAOEA==", "not base64", 17])
def test_uplink_whose_frm_payload_is_not_base64_is_rejected(bad: Any) -> None:
    event = load("uplink_lora_2gw")
    event["data"]["uplink_message"]["frm_payload"] = bad
    _raises(event, "frm_payload is not base64")


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("f_cnt", "1842"),
        ("f_port", -1),
        ("confirmed", "true"),
        ("consumed_airtime", "61ms"),
        ("packet_error_rate", "1%"),
    ],
)
def test_uplink_with_a_mistyped_field_is_rejected(field: str, bad: Any) -> None:
    event = load("uplink_lora_2gw")
    event["data"]["uplink_message"][field] = bad
    _raises(event, "as.up.data.forward 01JBEBB4XXR5XFFNF94PCHW6BX")


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("rssi", "-87"),
        ("snr", True),
        ("channel_index", 2.5),
        ("time", "09:15:40"),
        ("gateway_ids", "acme-gw-rooftop-01"),
        ("location", [52.3, 4.8]),
    ],
)
def test_uplink_with_a_malformed_gateway_entry_is_rejected(field: str, bad: Any) -> None:
    event = load("uplink_lora_2gw")
    event["data"]["uplink_message"]["rx_metadata"][1][field] = bad
    _raises(event, "as.up.data.forward 01JBEBB4XXR5XFFNF94PCHW6BX")


def test_uplink_without_any_device_identifiers_is_rejected() -> None:
    event = load("uplink_lora_2gw")
    del event["data"]["end_device_ids"]
    event["identifiers"] = [{"application_ids": {"application_id": APP}}]
    _raises(event, "no end device identifiers")


def test_join_without_join_accept_is_rejected() -> None:
    event = load("join_forward")
    del event["data"]["join_accept"]
    _raises(event, "as.up.join.forward 01JBEE1AGS3T5V7W9X1Y3Z5A7B", "no join_accept")


@pytest.mark.parametrize(
    ("stem", "key"),
    [
        ("down_sent", "downlink_sent"),
        ("down_ack", "downlink_ack"),
        ("down_nack", "downlink_nack"),
        ("down_failed", "downlink_failed"),
        ("down_queue_invalidated", "downlink_queue_invalidated"),
    ],
)
def test_downlink_lifecycle_event_without_its_item_is_rejected(stem: str, key: str) -> None:
    event = load(stem)
    del event["data"][key]
    _raises(event, f"no {key}")


@pytest.mark.parametrize("bad", [[["nested"]], [1, "ingestd:outbox:7"], "ingestd:outbox:7"])
def test_downlink_with_malformed_correlation_ids_is_rejected(bad: Any) -> None:
    event = load("down_receive")
    event["data"]["correlation_ids"] = bad
    _raises(event, "as.down.data.receive 01JBEF3Q3B5C7D9E1F3G5H7J9K", "correlation_ids")


def test_known_event_whose_data_is_not_an_object_is_rejected() -> None:
    event = load("down_drop")
    event["data"] = "no_device_session"
    _raises(event, "data is not an object")
    with pytest.raises(MalformedEvent, match="data is not an object"):
        event_row(event, stream=STREAM)


# --- outbox correlation ids --------------------------------------------------------------


def test_outbox_correlation_id_round_trips() -> None:
    assert OUTBOX_CID_PREFIX == "ingestd:outbox:"
    assert outbox_correlation_id(42) == "ingestd:outbox:42"
    assert outbox_id_from([outbox_correlation_id(42)]) == 42
    assert outbox_id_from([outbox_correlation_id(2**63 - 1)]) == 2**63 - 1
    assert len(outbox_correlation_id(2**63 - 1)) <= 100  # TTS's limit per id


@pytest.mark.parametrize("bad", [0, -1, True, 2**63, "42"])
def test_outbox_correlation_id_refuses_ids_the_outbox_cannot_have(bad: Any) -> None:
    with pytest.raises(ValueError, match="positive 64-bit integer"):
        outbox_correlation_id(bad)


@pytest.mark.parametrize(
    ("cids", "expected"),
    [
        pytest.param(None, None, id="none"),
        pytest.param([], None, id="empty"),
        pytest.param(["ingestd:outbox:7"], 7, id="alone"),
        pytest.param(PUSH_CTX_CIDS, None, id="only-tts-ids"),
        pytest.param(OUTBOX_7_CIDS, 7, id="among-tts-ids"),
        pytest.param(["ingestd:outbox:abc"], None, id="non-numeric"),
        pytest.param(["ingestd:outbox:"], None, id="no-digits"),
        pytest.param(["ingestd:outbox:-3"], None, id="negative"),
        pytest.param(["ingestd:outbox:+3"], None, id="plus-sign"),
        pytest.param(["ingestd:outbox: 3"], None, id="space"),
        pytest.param(["ingestd:outbox:1_000"], None, id="underscore"),
        pytest.param(["ingestd:outbox:007"], None, id="leading-zero"),
        pytest.param(["ingestd:outbox:0"], None, id="zero"),
        pytest.param(["ingestd:outbox:\u0664\u0662"], None, id="non-ascii-digits"),
        pytest.param(["ingestd:outbox:9223372036854775808"], None, id="over-64-bit"),
        pytest.param(["ingestd:outbox:7:retry"], None, id="suffix"),
        pytest.param(
            ["myapp:outbox:7", "INGESTD:OUTBOX:8", "xingestd:outbox:9"], None, id="other-prefixes"
        ),
        pytest.param(["ingestd:outbox:x", "ingestd:outbox:12"], 12, id="first-valid-wins"),
        pytest.param(["ingestd:outbox:12", "ingestd:outbox:3"], 12, id="several-first-in-order"),
        pytest.param([None, 7, ["ingestd:outbox:1"], "ingestd:outbox:5"], 5, id="non-strings"),
    ],
)
def test_outbox_id_from(cids: Any, expected: int | None) -> None:
    assert outbox_id_from(cids) == expected


def test_outbox_id_from_accepts_any_iterable() -> None:
    assert outbox_id_from(iter(("as:downlink:01X", "ingestd:outbox:31"))) == 31


# --- times and durations -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("2024-10-30T09:15:40Z", t(9, 15, 40), id="0-digits"),
        pytest.param("2024-10-30T09:15:40.349Z", t(9, 15, 40, 349000), id="3-digits"),
        pytest.param("2024-10-30T09:15:40.349611Z", t(9, 15, 40, 349611), id="6-digits"),
        pytest.param("2024-10-30T09:15:40.349611524Z", t(9, 15, 40, 349611), id="9-digits"),
        pytest.param("2024-10-30T09:15:40.999999999Z", t(9, 15, 40, 999999), id="ns-truncated"),
        pytest.param("2024-10-30T11:15:40.5+02:00", t(9, 15, 40, 500000), id="plus-offset"),
        pytest.param("2024-10-30T03:45:40-05:30", t(9, 15, 40), id="minus-offset"),
        pytest.param("2024-10-30T09:15:40+00:00", t(9, 15, 40), id="zero-offset"),
        pytest.param("2024-10-30t09:15:40.1z", t(9, 15, 40, 100000), id="lower-case"),
    ],
)
def test_parse_time_gives_aware_utc(text: str, expected: datetime) -> None:
    parsed = parse_time(text)
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)
    assert parsed.tzinfo is UTC


def test_parse_time_crossing_midnight_moves_the_date() -> None:
    assert parse_time("2024-10-31T01:00:00+02:00") == datetime(2024, 10, 30, 23, tzinfo=UTC)
    assert parse_time("2024-10-30T23:00:00-02:00") == datetime(2024, 10, 31, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "yesterday",
        "2024-10-30",
        "2024-10-30T09:15:40",
        "2024-13-30T09:15:40Z",
        "2024-10-30T25:15:40Z",
        "2024-10-30T09:15:40+25:00",
        None,
        1730279740,
        b"2024-10-30T09:15:40Z",
    ],
)
def test_parse_time_rejects_junk_and_times_without_offset(bad: Any) -> None:
    with pytest.raises(MalformedEvent, match="timestamp"):
        parse_time(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.061696s", 0.061696),
        ("1s", 1.0),
        ("0s", 0.0),
        ("2.113536s", 2.113536),
        ("0.000000001s", 1e-9),
        ("1.500s", 1.5),
        ("-0.5s", -0.5),
    ],
)
def test_parse_duration_s(text: str, expected: float) -> None:
    assert parse_duration_s(text) == expected


@pytest.mark.parametrize("bad", ["0.061696", "s", "", "61ms", "nans", "infs", 0.5, None])
def test_parse_duration_s_rejects_junk(bad: Any) -> None:
    with pytest.raises(MalformedEvent, match="duration"):
        parse_duration_s(bad)


@pytest.mark.parametrize(
    ("cids", "expected"),
    [
        (
            ["as:downlink:01J", "rpc:/ttn.lorawan.v3.AppAs/DownlinkQueuePush:ingestd-outbox-42-1"],
            42,
        ),
        (["rpc:/ttn.lorawan.v3.AppAs/DownlinkQueueReplace:ingestd-outbox-7-3"], 7),
        (["rpc:/ttn.lorawan.v3.AppAs/DownlinkQueuePush:01JBEBB4PQVVTVY4DDX4KR30FD"], None),
        (["rpc:/ttn.lorawan.v3.AppAs/DownlinkQueuePush:ingestd-outbox-x-1"], None),
        (["rpc:/ttn.lorawan.v3.AppAs/DownlinkQueuePush:ingestd-outbox-5-1", "ingestd:outbox:9"], 9),
    ],
)
def test_a_drop_event_finds_its_outbox_row_through_the_push_request_id(
    cids: list[str], expected: int | None
) -> None:
    """as.down.data.drop has only context ids; the worker's X-Request-ID is in the rpc: id."""
    assert outbox_id_from(cids) == expected


# --- values no column could hold: rejected here, per event, not by the database ---------


@pytest.mark.parametrize(
    "identifiers",
    [
        [{"device_ids": "wm-0001"}],
        [{"device_ids": ["wm-0001"]}],
        [{"device_ids": {"device_id": "wm-0001", "application_ids": "acme"}}],
        [{"application_ids": 42}],
        [{"device_ids": {"device_id": 7, "application_ids": {"application_id": "acme"}}}],
        [{"device_ids": {"device_id": "d" * 65}}],
        [{"device_ids": {"device_id": "d", "dev_eui": {"eui": "70B3D57ED005A1F2"}}}],
        [{"application_ids": {"application_id": ["acme"]}}],
    ],
)
def test_event_whose_identifiers_hold_the_wrong_types_is_rejected_by_event_row(
    identifiers: Any,
) -> None:
    event = load("uplink_lora_2gw")
    event["identifiers"] = identifiers
    with pytest.raises(MalformedEvent, match=r"01JBEBB4XXR5XFFNF94PCHW6BX: .*identifiers"):
        event_row(event, stream=STREAM)


@pytest.mark.parametrize("bad", ["01JBEBB4XXR5\x00XFFNF94PCHW6BX", "\x00"])
def test_unique_id_or_name_holding_a_nul_is_rejected(bad: str) -> None:
    event = load("uplink_lora_2gw")
    event["unique_id"] = bad
    with pytest.raises(MalformedEvent, match="unique_id"):
        event_row(event, stream=STREAM)
    event = load("uplink_lora_2gw")
    event["name"] = "as.up.data.forward\x00"
    with pytest.raises(MalformedEvent, match="name"):
        event_row(event, stream=STREAM)


@pytest.mark.parametrize(
    ("field", "bad"),
    [("f_cnt", 2**32), ("f_cnt", 2**63), ("f_cnt", 2**64 - 1), ("f_port", 256), ("f_port", 2**40)],
)
def test_uplink_counter_or_port_past_its_protocol_range_is_rejected_not_clamped(
    field: str, bad: int
) -> None:
    event = load("uplink_lora_2gw")
    event["data"]["uplink_message"][field] = bad
    _raises(event, f"uplink_message.{field} is not an integer from 0 to")


def test_uplink_counter_at_the_top_of_uint32_is_kept() -> None:
    event = load("uplink_lora_2gw")
    event["data"]["uplink_message"]["f_cnt"] = 2**32 - 1
    event["data"]["uplink_message"]["f_port"] = 255
    values = normalize(event)[0].values
    assert (values["f_cnt"], values["f_port"]) == (2**32 - 1, 255)


def test_downlink_port_past_255_is_rejected() -> None:
    event = load("down_sent")
    event["data"]["downlink_sent"]["f_port"] = 256
    _raises(event, "downlink.f_port is not an integer from 0 to 255")


@pytest.mark.parametrize("frequency", ["9223372036854775808", "18446744073709551615", 2**63])
def test_uplink_frequency_past_int64_is_stored_as_unknown(frequency: Any) -> None:
    # A valid uint64 the BIGINT column cannot hold: None, and events.data keeps the value.
    event = load("uplink_lora_2gw")
    event["data"]["uplink_message"]["settings"]["frequency"] = frequency
    assert normalize(event)[0].values["frequency"] is None
    assert (
        event_row(event, stream=STREAM)["data"]["uplink_message"]["settings"]["frequency"]
        == frequency
    )


@pytest.mark.parametrize("bad", [-1, "-868500000", 1.5])
def test_uplink_frequency_that_is_not_a_uint64_is_rejected(bad: Any) -> None:
    event = load("uplink_lora_2gw")
    event["data"]["uplink_message"]["settings"]["frequency"] = bad
    _raises(event, "settings.frequency is not a uint64")


@pytest.mark.parametrize(
    ("key", "bad"),
    [
        ("spreading_factor", "SF7"),
        ("spreading_factor", 2**31),
        ("bandwidth", -125000),
        ("bandwidth", 2**63),
        ("coding_rate", 45),
        ("coding_rate", "4/5" * 10),
    ],
)
def test_uplink_data_rate_with_a_value_no_column_holds_is_rejected(key: str, bad: Any) -> None:
    event = load("uplink_lora_2gw")
    event["data"]["uplink_message"]["settings"]["data_rate"]["lora"][key] = bad
    _raises(event, "settings.data_rate.lora has a mistyped or out of range value")


@pytest.mark.parametrize("bad", ["9999-12-31T23:00:00-05:00", "0001-01-01T00:30:00+01:00"])
def test_time_that_leaves_the_datetime_range_in_utc_is_rejected(bad: str) -> None:
    with pytest.raises(MalformedEvent, match="out of range in UTC"):
        parse_time(bad)


def test_a_simulated_uplink_is_marked_simulated() -> None:
    """TTS marks Console/API "simulate uplink" with data.simulated; the views leave it out."""
    event = load("uplink_lora_2gw")
    assert normalize(event)[0].values["simulated"] is False
    event["data"]["simulated"] = True
    assert normalize(event)[0].values["simulated"] is True
