"""The subcommands behind ``ingestd``: each loads settings, does its job, returns an exit code."""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path
from typing import IO

import sqlalchemy as sa

from ingestd import migrate as migrations
from ingestd.config import Settings, load_settings
from ingestd.config.values import stream_name_problem
from ingestd.db import create_engine
from ingestd.errors import ConfigError, SchemaNotReady, UsageError
from ingestd.importer import ImportSummary, import_stream
from ingestd.logs import configure_logging
from ingestd.runtime import tune_for_database
from ingestd.store import Store

PROGRESS_INTERVAL_S = 0.5


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    configure_logging(settings.logging)
    tune_for_database(sa.make_url(settings.database.url).get_backend_name())
    return settings


def migrate(args: argparse.Namespace) -> int:
    """``ingestd migrate``: upgrade the configured database to head (idempotent)."""
    settings = _settings(args)
    engine = create_engine(settings.database.url)
    try:
        before = migrations.current_revision(engine)
        migrations.upgrade(engine)
        after = migrations.current_revision(engine)
    finally:
        engine.dispose()
    db = settings.database.safe_url
    if before == after:
        print(f"{db}: already at revision {after}")
    else:
        print(f"{db}: migrated {before or 'empty database'} -> {after}")
    return 0


def import_(args: argparse.Namespace) -> int:
    """``ingestd import FILE|-``: ingest a recorded stream body and print what was stored."""
    settings = _settings(args)
    problem = stream_name_problem(args.stream)
    if problem is not None:
        raise UsageError(f"import: --stream {problem}")
    with ExitStack() as stack:
        if args.file == "-":
            source: IO[bytes] = sys.stdin.buffer
            total = None
        else:
            source, total = _open_input(Path(args.file))
            stack.enter_context(source)
        engine = create_engine(settings.database.url)
        stack.callback(engine.dispose)
        migrations.upgrade(engine)
        progress = _Progress(total) if sys.stderr.isatty() else None
        started = time.perf_counter()
        summary = import_stream(
            Store(engine),
            source,
            stream=args.stream,
            progress=progress,
        )
        elapsed = time.perf_counter() - started
        if progress is not None:
            progress.done()
    _print_import_summary(args, summary, elapsed)
    return 0


def _open_input(path: Path) -> tuple[IO[bytes], int]:
    """``path`` opened for reading with its size; a ``UsageError`` (one line) if it cannot be."""
    if path.is_dir():
        raise UsageError(f"import: {path} is a directory, not a capture file")
    try:
        source = path.open("rb")
    except OSError as exc:
        raise UsageError(f"import: cannot read {path}: {exc.strerror or exc}") from None
    return source, os.fstat(source.fileno()).st_size


def _print_import_summary(args: argparse.Namespace, summary: ImportSummary, elapsed: float) -> None:
    r = summary.result
    rate = r.events / elapsed if elapsed > 0 else 0.0
    print(
        f"imported {args.file} into stream {args.stream!r} "
        f"in {elapsed:.1f} s ({rate:,.0f} events/s)"
    )
    for label, value in (
        ("events stored", r.events),
        ("uplinks", r.rows.get("uplinks", 0)),
        ("gateway receptions", r.rows.get("uplink_receptions", 0)),
        ("joins", r.rows.get("joins", 0)),
        ("downlink events", r.rows.get("downlink_events", 0)),
        ("rejected", r.rejected),
        ("duplicates skipped", r.duplicates),
    ):
        print(f"  {label:<20} {value:>10,}")
    if r.rejected:
        print("  (see the rejected_events table for what could not be used and why)")
    if summary.error is not None:
        print(
            f"the capture ends with a TTS error: {summary.error.describe()}; "
            "everything before it was stored",
            file=sys.stderr,
        )


class _Progress:
    """A one-line progress display on a terminal: events, events/s, bytes read."""

    def __init__(self, total_bytes: int | None) -> None:
        self.total = total_bytes
        self.started = time.perf_counter()
        self.last = 0.0

    def __call__(self, summary: ImportSummary) -> None:
        now = time.perf_counter()
        if now - self.last < PROGRESS_INTERVAL_S:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        read = f"{summary.bytes_read / 2**20:,.1f} MiB"
        if self.total:
            read += (
                f" of {self.total / 2**20:,.1f} MiB ({100 * summary.bytes_read / self.total:.0f}%)"
            )
        events = summary.result.events + summary.result.duplicates
        sys.stderr.write(f"\r{events:,} events, {events / elapsed:,.0f} events/s, {read}   ")
        sys.stderr.flush()

    def done(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


def backfill(args: argparse.Namespace) -> int:
    """``ingestd backfill``: heal a window from the Storage Integration (ingestd.backfill)."""
    from ingestd.backfill import run_cli

    return run_cli(args, _settings(args))


def run(args: argparse.Namespace) -> int:
    """``ingestd run``: the daemon."""
    from ingestd.service import run_service

    settings = _settings(args)
    return run_service(settings, migrate_first=not args.no_migrate)


def check(args: argparse.Namespace) -> int:
    """``ingestd check``: one line per check; exit 0 only when all pass."""
    from ingestd.cli.check import run_checks

    return run_checks(load_settings(args.config))


def status(args: argparse.Namespace) -> int:
    """``ingestd status``: streams and outbox at a glance."""
    from ingestd.cli.status import print_status

    return print_status(load_settings(args.config), as_json=args.json)


def demo(args: argparse.Namespace) -> int:
    """``ingestd demo``: see it work with one command."""
    from ingestd.cli.demo import run_demo

    return run_demo(database=args.database, seconds=args.seconds)


def _age(text: str, option: str) -> timedelta:
    from ingestd.config.values import Invalid, parse_age

    try:
        return parse_age(text)
    except Invalid as exc:
        raise ConfigError([f"{option}: {exc}"]) from None


def _require_schema(engine: sa.Engine, settings: Settings) -> None:
    """Refuse a database that is not at this ingestd's schema (before reading or deleting)."""
    if not migrations.is_up_to_date(engine):
        raise SchemaNotReady(
            f"{settings.database.safe_url} is not at this ingestd's schema: "
            "run `ingestd migrate` first"
        )


def prune(args: argparse.Namespace) -> int:
    """``ingestd prune --older-than AGE [--dry-run]``: retention, rows deleted per table."""
    from ingestd.prune import prune as prune_rows

    older_than = _age(args.older_than, "--older-than")
    settings = _settings(args)
    engine = create_engine(settings.database.url)
    try:
        _require_schema(engine, settings)
        result = prune_rows(engine, older_than=older_than, dry_run=args.dry_run)
    finally:
        engine.dispose()
    verb = "would delete" if result.dry_run else "deleted"
    print(f"rows older than {result.cutoff.isoformat(timespec='seconds')} ({verb}):")
    for table, n in result.deleted.items():
        print(f"  {table:<20} {n:>10,}")
    print(f"  {'total':<20} {result.total:>10,}   ({result.elapsed_s:.1f} s)")
    return 0


def report(args: argparse.Namespace) -> int:
    """``ingestd report [--since AGE] [--application ID] -o FILE``: one offline HTML file."""
    from ingestd.report import write_report

    since = _age(args.since, "--since")
    settings = _settings(args)
    engine = create_engine(settings.database.url)
    try:
        _require_schema(engine, settings)
        summary = write_report(
            engine, Path(args.output), since=since, application_id=args.application
        )
    finally:
        engine.dispose()
    print(summary)
    return 0
