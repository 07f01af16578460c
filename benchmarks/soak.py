"""Soak: the chaos harness of ``tests/acceptance/test_chaos.py``, run for minutes, on purpose.

    python benchmarks/soak.py [--minutes 10] [--pg URL] [--rate 100] [--seed N]
        [--poison bad_field,truncated] [--keep]

``ingestd run`` (a real process) follows the in-process simulator while a seeded plan of
faults runs one after another: drops, TCP resets, stalls, out-of-order delivery, 5xx/429
bursts, poison events, database locks, PostgreSQL backend kills (with ``--pg``) and SIGKILL
with restart. At the end it checks the issue 8 invariant (every emitted event stored once
or inside a recorded gap, poison in ``rejected_events``, every gap next to a fault) and
prints: events emitted, faults injected by kind, restarts, stored = emitted, duplicates,
gaps, and the daemon's RSS (peak ``VmHWM`` over all its processes, ``VmRSS`` at the end).
Exit status 1 when the invariant failed. The fault plan and the daemon log stay in the
work directory (printed; removed unless ``--keep`` or a failure).

Not in CI: the bounded version is the ``chaos`` test.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import sqlalchemy as sa  # noqa: E402
from chaos_harness import Chaos, ChaosConfig, seed_from_env  # noqa: E402
from support import ProcessTracker  # noqa: E402

from ingestd import migrate  # noqa: E402
from ingestd.db import create_engine  # noqa: E402


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="fault phase length (default 10)")
    p.add_argument("--pg", default="", help="PostgreSQL admin URL: soak on a fresh database there")
    p.add_argument("--rate", type=float, default=100.0, help="uplinks/s (default 100)")
    p.add_argument("--seed", type=int, default=None, help="plan seed (default: CHAOS_SEED/random)")
    p.add_argument(
        "--poison",
        default="bad_field,truncated",
        help="poison kinds (also: bad_identifiers, huge_f_cnt, nul)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    return p.parse_args()


def main() -> int:
    args = _args()
    workdir = Path(tempfile.mkdtemp(prefix="ingestd-soak-"))
    admin_engine = None
    database = ""
    if args.pg:
        admin_engine = sa.create_engine(args.pg, isolation_level="AUTOCOMMIT")
        database = f"ingestd_soak_{uuid.uuid4().hex[:10]}"
        with admin_engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{database}"')
        db_url = sa.make_url(args.pg).set(database=database).render_as_string(hide_password=False)
        dialect = "postgresql"
    else:
        db_url = f"sqlite:///{workdir / 'soak.db'}"
        dialect = "sqlite"
    engine = create_engine(db_url)
    migrate.upgrade(engine)
    engine.dispose()
    cfg = ChaosConfig(
        seed=args.seed if args.seed is not None else seed_from_env(),
        dialect=dialect,
        duration_s=args.minutes * 60,
        rate=args.rate,
        poison_kinds=tuple(args.poison.split(",")),
        settle_timeout_s=180.0,
        stuck_s=30.0,
    )
    plan_file = workdir / "fault-plan.txt"
    tracker = ProcessTracker()
    ok = False

    def out(text: str) -> None:
        if text.startswith("chaos seed=") and "fault plan:" in text:
            head, _, plan = text.partition("fault plan:\n")
            plan_file.write_text(plan + "\n")
            print(head.strip(), f"\nfault plan ({plan.count(chr(10)) + 1} faults): {plan_file}")
        else:
            print(text)
        sys.stdout.flush()

    try:
        print(f"work directory: {workdir}")
        report = Chaos(cfg, db_url=db_url, workdir=workdir, tracker=tracker, out=out).run()
        ok = not report.problems
        print("invariant held" if ok else "INVARIANT FAILED")
    finally:
        tracker.kill_all()
        if admin_engine is not None:
            with admin_engine.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
            admin_engine.dispose()
        if ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
