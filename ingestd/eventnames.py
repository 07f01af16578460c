"""TTS's catalogue of event names and its ``names`` filter rules, as one pure function.

The catalogue (``data/tts_event_names.txt``) is generated from lorawan-stack
``config/messages.json`` (every ``events.Define`` registers an ``event:<name>`` message there).
:func:`expand_names` is lorawan-stack ``pkg/events/pattern.go`` ``NamesFromPatterns``:

- an entry that starts *and* ends with ``/`` is a regexp: ``strings.Trim(name, "/")`` (every
  leading and trailing slash goes, so ``"/"`` is the empty regexp and matches every name),
  compiled with Go's RE2 syntax and matched *unanchored* (``MatchString``) against every
  defined name. A regexp that does not compile is ``invalid_regexp``; one that matches
  nothing is ``no_matching_events``;
- any other entry must be a defined name, exactly, else ``unknown_event_name``;
- the result is the sorted union, and ``()`` for an empty filter (which means "all events").

RE2, not Python ``re``: TTS rejects look-arounds (``(?!…)``) and ``\\Z``, and accepts ``\\z``.
The ``google-re2`` bindings wrap the C++ RE2 library that Go's ``regexp`` reimplements;
both parse the same Perl-like syntax with ``^``/``$`` anchored at the text's ends.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from importlib import resources

import re2

from ingestd.errors import EventNamesRejected

CATALOGUE_FILE = "tts_event_names.txt"
# TTS errors.DefineInvalidArgument(name, message_format) in pkg/events/pattern.go.
UNKNOWN_EVENT_NAME = "unknown_event_name"
NO_MATCHING_EVENTS = "no_matching_events"
INVALID_REGEXP = "invalid_regexp"
MESSAGE_FORMATS = {
    UNKNOWN_EVENT_NAME: "unknown event `{name}`",
    NO_MATCHING_EVENTS: "no matching events for regexp `{regexp}`",
    INVALID_REGEXP: "invalid regexp",
}


@functools.cache
def defined_names() -> frozenset[str]:
    """Every event name TTS v3.32 defines (the shipped catalogue)."""
    text = resources.files("ingestd").joinpath("data", CATALOGUE_FILE).read_text("utf-8")
    return frozenset(
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    )


def _options() -> re2.Options:
    options = re2.Options()
    options.log_errors = False  # RE2 otherwise prints every parse error to stderr
    return options


def is_pattern(entry: str) -> bool:
    """Whether ``entry`` is a ``/regexp/`` (Go ``HasPrefix("/") && HasSuffix("/")``)."""
    return entry.startswith("/") and entry.endswith("/")


def _rejected(error_name: str, **attributes: str) -> EventNamesRejected:
    text = MESSAGE_FORMATS[error_name].format(**attributes)
    return EventNamesRejected(f"{error_name}: {text}", error_name=error_name, attributes=attributes)


def expand_names(patterns: Iterable[str], defined: Iterable[str] | None = None) -> tuple[str, ...]:
    """The sorted defined names ``patterns`` select, or raise :class:`EventNamesRejected`.

    ``defined`` defaults to the shipped catalogue. The first bad entry wins, as in TTS.
    """
    names = defined_names() if defined is None else frozenset(defined)
    found: set[str] = set()
    for entry in patterns:
        if is_pattern(entry):
            source = entry.strip("/")
            try:
                regexp = re2.compile(source, _options())
            except re2.error as exc:
                raise _rejected(INVALID_REGEXP) from exc
            matched = {name for name in names if regexp.search(name) is not None}
            if not matched:
                raise _rejected(NO_MATCHING_EVENTS, regexp=source)
            found |= matched
        elif entry in names:
            found.add(entry)
        else:
            raise _rejected(UNKNOWN_EVENT_NAME, name=entry)
    return tuple(sorted(found))
