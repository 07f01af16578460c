"""The ``names`` filter is expanded exactly as TTS v3.32 does (lorawan-stack pkg/events/pattern.go)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ingestd import eventnames
from ingestd.errors import EventNamesRejected, PermanentError
from ingestd.eventnames import expand_names

CONSOLE_DEFAULT = r"/^ns\.mac\..*\.answer\.reject$/"  # the Console's default event filter


def rejected(patterns: list[str]) -> EventNamesRejected:
    with pytest.raises(EventNamesRejected) as info:
        expand_names(patterns)
    return info.value


def test_the_catalogue_is_the_248_names_of_messages_json_with_its_source_named() -> None:
    names = eventnames.defined_names()
    assert len(names) == 248
    assert {
        "as.up.data.forward",
        "as.down.data.ack.forward",
        "ns.mac.link_adr.answer.reject",
        "gs.up.receive",
        "end_device.update",
        "js.join.accept",
    } <= names
    assert "events.stream.start" not in names  # synthetic, never defined
    header = (Path(eventnames.__file__).parent / "data" / eventnames.CATALOGUE_FILE).read_text()
    assert "config/messages.json" in header and "1d2182161975e038d6634b7dd4dd15fda86b1d68" in header


def test_the_consoles_default_filter_expands_to_every_mac_answer_reject() -> None:
    names = expand_names([CONSOLE_DEFAULT])
    assert len(names) == 9  # counted in messages.json: nine MAC commands have a reject answer
    assert "ns.mac.link_adr.answer.reject" in names
    assert all(n.startswith("ns.mac.") and n.endswith(".answer.reject") for n in names)
    assert list(names) == sorted(names)


def test_exact_names_must_be_defined() -> None:
    assert expand_names(["as.up.data.forward", "gs.up.receive"]) == (
        "as.up.data.forward",
        "gs.up.receive",
    )
    err = rejected(["as.up.data.forward", "as.down.ack.forward"])  # a name that does not exist
    assert (err.error_name, err.attributes) == (
        "unknown_event_name",
        {"name": "as.down.ack.forward"},
    )
    assert isinstance(err, PermanentError)
    assert rejected(["events.stream.start"]).error_name == "unknown_event_name"
    assert rejected(["as.up.*"]).error_name == "unknown_event_name"  # no globs


def test_regexps_are_unanchored_and_unioned_with_exact_names() -> None:
    names = expand_names(["/up\\.data\\.forward/", "as.down.data.receive"])
    assert set(names) == {"as.up.data.forward", "ns.up.data.forward", "as.down.data.receive"}


def test_a_regexp_matching_nothing_names_the_trimmed_regexp() -> None:
    err = rejected(["/^as\\.down\\.queued/"])
    assert (err.error_name, err.attributes) == (
        "no_matching_events",
        {"regexp": "^as\\.down\\.queued"},
    )


def test_every_leading_and_trailing_slash_is_trimmed_as_go_strings_trim_does() -> None:
    assert expand_names(["//^as\\.up\\.data\\.forward$//"]) == ("as.up.data.forward",)
    assert len(expand_names(["/"])) == 248  # "/" trims to the empty regexp, which matches all


@pytest.mark.parametrize(
    ("pattern", "python_re_compiles"),
    [
        pytest.param(r"/^as\.(?!down)/", True, id="negative lookahead"),
        pytest.param(r"/(?<=as\.)up/", True, id="lookbehind"),
        pytest.param(r"/forward\Z/", True, id="backslash Z"),
        pytest.param(r"/(a)\1/", True, id="backreference"),
        pytest.param(r"/as.(/", False, id="unbalanced"),
    ],
)
def test_what_re2_cannot_parse_is_invalid_regexp(pattern: str, python_re_compiles: bool) -> None:
    err = rejected([pattern])
    assert (err.error_name, err.attributes) == ("invalid_regexp", {})
    compiles = True
    try:
        re.compile(pattern.strip("/"))
    except re.error:
        compiles = False
    assert compiles is python_re_compiles  # the difference the simulator used to get wrong


def test_re2_accepts_what_python_re_rejects() -> None:
    """``\\z`` is end of text in RE2 (Go), an error in Python ``re``."""
    with pytest.raises(re.error):
        re.compile(r"forward\z")
    names = expand_names([r"/^as\.up\..*forward\z/"])
    assert "as.up.data.forward" in names and "as.up.data.forward" in names
    assert all(n.endswith("forward") for n in names)


def test_the_first_bad_entry_wins_and_empty_means_all() -> None:
    assert rejected(["/(?!x)/", "nope"]).error_name == "invalid_regexp"
    assert rejected(["nope", "/(?!x)/"]).error_name == "unknown_event_name"
    assert expand_names([]) == ()


def test_a_custom_catalogue_models_an_older_server() -> None:
    older = {"as.up.data.forward", "as.down.data.forward"}  # before v3.32.1's lifecycle events
    assert rejected_with(older, ["as.down.data.ack.forward"]) == "unknown_event_name"
    assert expand_names(["/^as\\.down/"], older) == ("as.down.data.forward",)


def rejected_with(defined: set[str], patterns: list[str]) -> str:
    with pytest.raises(EventNamesRejected) as info:
        expand_names(patterns, defined)
    return info.value.error_name
