"""The ``ingestd`` command line: parses arguments, loads settings, maps outcomes to exit codes.

Exit codes: 0 ok, 1 runtime failure, 2 bad usage or bad configuration.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from ingestd import __version__
from ingestd.errors import ConfigError, IngestdError, UsageError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ingestd",
        description="Stream The Things Stack events into SQL; push downlinks from a SQL outbox.",
    )
    parser.add_argument("--version", action="version", version=f"ingestd {__version__}")
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="TOML config file (default: $INGESTD_CONFIG, else ./ingestd.toml, else defaults)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    sub.add_parser("migrate", help="upgrade the database schema to the newest revision")

    run = sub.add_parser("run", help="run the daemon (streams, and the downlink worker if enabled)")
    run.add_argument("--no-migrate", action="store_true", help="do not migrate before starting")

    sub.add_parser("check", help="validate config, database and TTS access; one line per check")

    status = sub.add_parser("status", help="per-stream cursor, lag, gaps; outbox counts")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    imp = sub.add_parser("import", help="ingest a recorded stream body (file or - for stdin)")
    imp.add_argument("file", metavar="FILE|-")
    imp.add_argument("--stream", default="import", help="cursor key for this import")

    from ingestd import backfill

    backfill.add_arguments(
        sub.add_parser("backfill", help="fetch a time window from the Storage Integration")
    )

    prune = sub.add_parser("prune", help="delete event rows older than a duration (retention)")
    prune.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 90d, 12h")
    prune.add_argument("--dry-run", action="store_true", help="count, delete nothing")

    report = sub.add_parser("report", help="write a self-contained HTML report of stored traffic")
    report.add_argument("--since", default="7d", metavar="AGE", help="window (default 7d)")
    report.add_argument("--application", metavar="ID", help="one application only")
    report.add_argument("-o", "--output", default="report.html", metavar="FILE")

    from ingestd.sim import cli as simulate

    simulate.add_arguments(sub.add_parser("simulate", help="serve a simulated TTS on loopback"))

    demo = sub.add_parser(
        "demo", help="simulator + daemon into a local SQLite file, then a summary"
    )
    demo.add_argument("--seconds", type=float, default=4.0, help="how long to stream")
    demo.add_argument("--database", default="ingestd-demo.db", help="SQLite file to write")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ingestd`` console script."""
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (ConfigError, UsageError) as exc:
        print(_masked(f"ingestd: {exc}"), file=sys.stderr)
        return EXIT_USAGE
    except IngestdError as exc:
        print(_masked(f"ingestd: error: {exc}"), file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `ingestd status | head`: the reader left; exit quietly (Python docs' recipe).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE


def _masked(text: str) -> str:
    """``text`` with configured secrets masked (an error may quote what TTS echoed)."""
    from ingestd.secrets import redact

    return redact(text)


def _dispatch(args: argparse.Namespace) -> int:
    from ingestd.cli import commands
    from ingestd.runtime import tune_gc

    tune_gc()  # after the imports, so that the modules are frozen
    if args.command == "simulate":
        from ingestd.sim import cli as simulate

        return simulate.run(args)
    handlers: dict[str, Callable[[argparse.Namespace], int]] = {
        "migrate": commands.migrate,
        "run": commands.run,
        "check": commands.check,
        "status": commands.status,
        "import": commands.import_,
        "demo": commands.demo,
        "backfill": commands.backfill,
        "prune": commands.prune,
        "report": commands.report,
    }
    return handlers[args.command](args)
