"""Outbox SQL on SQLite and PostgreSQL: defaults, safe concurrent claims, per-device order,
stale claims, and lifecycle events that only ever move a row forward."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from outbox_rows import insert_unreadable, unreadable_values
from sqlalchemy.engine import Engine

from ingestd import schema
from ingestd.db import create_engine, is_postgres
from ingestd.outbox import sql as outbox

T = schema.downlink_outbox


def _now() -> datetime:
    return datetime.now(UTC)


def _later(s: float = 1.0) -> datetime:
    return _now() + timedelta(seconds=s)


def _insert(engine: Engine, device_id: str = "dev-1", n: int = 1, **values: Any) -> list[int]:
    rows = [
        {
            "application_id": "app-1",
            "device_id": device_id,
            "f_port": 1,
            "frm_payload": b"\x01",
            **values,
        }
        for _ in range(n)
    ]
    with engine.begin() as conn:
        return [conn.execute(sa.insert(T).values(r).returning(T.c.id)).scalar_one() for r in rows]


def _row(engine: Engine, outbox_id: int) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.select(T).where(T.c.id == outbox_id)).one()


def _claim(engine: Engine, limit: int = 10, worker: str = "w1") -> list[int]:
    return [i.id for i in outbox.claim_due(engine, worker_id=worker, limit=limit, now=_later())]


def test_plain_sql_insert_gets_every_default(engine: Engine) -> None:
    """The README's INSERTs (bytes literals differ per dialect) need nothing else."""
    blob = "'\\x0102AB'::bytea" if is_postgres(engine) else "X'0102AB'"
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO downlink_outbox (application_id, device_id, f_port, frm_payload) "
            f"VALUES ('app-1', 'dev-1', 10, {blob})"
        )
        conn.exec_driver_sql(
            "INSERT INTO downlink_outbox (application_id, device_id, f_port, decoded_payload) "
            "VALUES ('app-1', 'dev-2', 11, '{\"interval_minutes\": 15}')"
        )
    with engine.connect() as conn:
        rows = conn.execute(sa.select(T).order_by(T.c.id)).all()
    assert [r.frm_payload for r in rows] == [b"\x01\x02\xab", None]
    assert rows[1].decoded_payload == {"interval_minutes": 15}
    for r in rows:
        assert (r.confirmed, r.priority, r.operation, r.status, r.attempts) == (
            False,
            "NORMAL",
            "push",
            "pending",
            0,
        )
        assert r.last_error is None
        assert r.correlation_id is None
        assert r.verify_before_push is False
        assert abs((r.created_at - _now()).total_seconds()) < 60
        assert r.next_attempt_at <= _later()
        assert r.updated_at is not None
    claimed = outbox.claim_due(engine, worker_id="w1", limit=10, now=_later())
    assert [(c.device_id, c.status, c.attempts, c.correlation_id) for c in claimed] == [
        ("dev-1", "pushing", 1, f"ingestd:outbox:{rows[0].id}"),
        ("dev-2", "pushing", 1, f"ingestd:outbox:{rows[1].id}"),
    ]


@pytest.mark.parametrize(
    ("column", "value"), [("priority", "normal"), ("operation", "append"), ("status", "done")]
)
def test_check_constraints_reject_typos_at_insert(engine: Engine, column: str, value: str) -> None:
    with pytest.raises(sa.exc.IntegrityError):
        _insert(engine, **{column: value})


def test_ids_are_never_reused_after_deleting_the_newest_row(engine: Engine) -> None:
    """A reused id would inherit the old row's lifecycle events (matched by outbox id)."""
    first, second = _insert(engine, n=2)
    with engine.begin() as conn:
        conn.execute(sa.delete(T).where(T.c.id == second))
    (third,) = _insert(engine)
    assert third > second > first


def test_claims_one_row_per_device_in_insertion_order(engine: Engine) -> None:
    a1, a2, a3 = _insert(engine, "dev-a", n=3)
    (b1,) = _insert(engine, "dev-b")
    assert _claim(engine) == [a1, b1]
    assert _claim(engine) == []  # a2 waits for a1, which is still pushing
    outbox.mark_queued(engine, a1, request_id="r", now=_now())
    assert _claim(engine) == [a2]
    # a2 fails transiently and backs off: it holds back a3 (no overtaking)
    assert outbox.mark_retry(engine, a2, error="HTTP 503", next_attempt_at=_later(60), now=_now())
    assert _claim(engine) == []
    # once a2 has failed for good, a3 may go
    with engine.begin() as conn:
        conn.execute(sa.update(T).where(T.c.id == a2).values(status="failed"))
    assert _claim(engine) == [a3]


def test_not_yet_due_rows_are_not_claimed(engine: Engine) -> None:
    (row,) = _insert(engine, next_attempt_at=_later(30))
    assert _claim(engine) == []
    assert [i.id for i in outbox.claim_due(engine, worker_id="w", limit=5, now=_later(31))] == [row]


def test_concurrent_claims_never_take_the_same_row(db_url: str) -> None:
    """Four claimers on their own engines (like processes) drain 200 devices' rows."""
    engines = [create_engine(db_url) for _ in range(4)]
    try:
        for d in range(200):
            _insert(engines[0], f"dev-{d}", n=2)
        claims: list[list[int]] = [[] for _ in engines]
        start = threading.Barrier(len(engines))

        def drain(k: int) -> None:
            start.wait(timeout=10)
            idle = 0
            while idle < 3:
                got = [
                    i.id
                    for i in outbox.claim_due(engines[k], worker_id=f"w{k}", limit=7, now=_later())
                ]
                for outbox_id in got:
                    outbox.mark_queued(engines[k], outbox_id, request_id="r", now=_now())
                claims[k].extend(got)
                idle = 0 if got else idle + 1

        with ThreadPoolExecutor(len(engines)) as pool:
            list(pool.map(drain, range(len(engines))))
        every = [i for c in claims for i in c]
        assert len(every) == len(set(every)) == 400
        assert sum(1 for c in claims if c) >= 2  # the work really was shared
    finally:
        for e in engines:
            e.dispose()


@pytest.mark.postgres
def test_postgres_claim_skips_locked_rows_instead_of_waiting(pg_url: str) -> None:
    engine = create_engine(pg_url)
    try:
        (locked,) = _insert(engine, "dev-a")
        (free,) = _insert(engine, "dev-b")
        with engine.connect() as holder:
            holder.begin()
            holder.execute(sa.select(T.c.id).where(T.c.id == locked).with_for_update())
            started = time.monotonic()
            assert _claim(engine) == [free]
            assert time.monotonic() - started < 2.0
            holder.rollback()
        assert _claim(engine) == [locked]
    finally:
        engine.dispose()


def test_stale_claims_are_released_for_verification(engine: Engine) -> None:
    (mine,) = _insert(engine, "dev-a")
    (theirs,) = _insert(engine, "dev-b")
    outbox.claim_due(engine, worker_id="w1", limit=1, now=_now())
    outbox.claim_due(engine, worker_id="w2", limit=1, now=_now())
    assert (
        outbox.release_stale_claims(engine, older_than=_now() - timedelta(seconds=60), now=_now())
        == []
    )
    only_w1 = outbox.release_stale_claims(engine, older_than=_later(), now=_now(), claimed_by="w1")
    assert [i.id for i in only_w1] == [mine]
    assert _row(engine, theirs).status == "pushing"
    released = _row(engine, mine)
    assert (
        released.status,
        released.attempts,
        released.verify_before_push,
        released.claimed_by,
    ) == ("pending", 1, True, None)
    assert "claim expired" in released.last_error
    (again,) = outbox.claim_due(engine, worker_id="w3", limit=5, now=_later())
    assert (again.id, again.attempts, again.verify_before_push) == (mine, 2, True)


def test_release_claim_does_not_count_the_attempt(engine: Engine) -> None:
    (row,) = _insert(engine)
    _claim(engine)
    assert outbox.release_claim(
        engine, row, next_attempt_at=_later(5), now=_now(), note="waiting for a stream"
    )
    r = _row(engine, row)
    assert (r.status, r.attempts, r.last_error) == ("pending", 0, "waiting for a stream")
    assert _claim(engine) == []


def test_marks_record_outcomes_and_never_undo_event_progress(engine: Engine) -> None:
    ok, bad, moved = _insert(engine, "dev-a"), _insert(engine, "dev-b"), _insert(engine, "dev-c")
    _claim(engine)
    outbox.mark_queued(engine, ok[0], request_id="ingestd-outbox-1-1", now=_now())
    assert outbox.mark_failed(engine, bad[0], error="pkg/x:device_not_found: gone", now=_now())
    with engine.begin() as conn:  # an event moved it on while the push was in flight
        outbox.apply_downlink_events(conn, [_event("sent", moved[0])])
    assert not outbox.mark_retry(
        engine, moved[0], error="timeout", next_attempt_at=_later(), now=_now()
    )
    assert not outbox.mark_failed(engine, moved[0], error="late", now=_now())
    r_ok, r_bad, r_moved = (_row(engine, i[0]) for i in (ok, bad, moved))
    assert (r_ok.status, r_ok.request_id, r_ok.queued_at is not None) == (
        "queued",
        "ingestd-outbox-1-1",
        True,
    )
    assert (r_bad.status, r_bad.last_error) == ("failed", "pkg/x:device_not_found: gone")
    assert r_bad.finished_at is not None
    assert r_moved.status == "sent"


def test_one_claim_records_marks_of_every_kind_and_claims_freed_heads(engine: Engine) -> None:
    """The worker records its outcomes in the transaction of its next claim: each mark moves
    its own row, and a device whose row was just recorded gives its next row to that claim."""
    (a1, a2), (b1,), (c1,), (d1,) = (
        _insert(engine, "dev-a", n=2),
        _insert(engine, "dev-b"),
        _insert(engine, "dev-c"),
        _insert(engine, "dev-d"),
    )
    assert sorted(_claim(engine)) == [a1, b1, c1, d1]
    now = _now()
    marks = [
        outbox.Mark(kind="queued", outbox_id=a1, now=now, request_id="ingestd-outbox-1-1"),
        outbox.Mark(
            kind="retry", outbox_id=b1, now=now, error="HTTP 503", next_attempt_at=_later(60)
        ),
        outbox.Mark(kind="failed", outbox_id=c1, now=now, error="pkg/x:device_not_found"),
        outbox.Mark(kind="released", outbox_id=d1, now=now, next_attempt_at=now),
    ]
    claimed = outbox.claim_due(engine, worker_id="w2", limit=10, now=_later(), record=marks)
    assert sorted(i.id for i in claimed) == [a2, d1]
    rows = {i: _row(engine, i) for i in (a1, b1, c1, d1)}
    assert (rows[a1].status, rows[a1].request_id, rows[a1].claimed_by) == (
        "queued",
        "ingestd-outbox-1-1",
        "w1",  # who pushed it
    )
    assert rows[a1].queued_at == now
    assert (rows[b1].status, rows[b1].attempts, rows[b1].last_error) == ("pending", 1, "HTTP 503")
    assert rows[b1].claimed_at is None
    assert (rows[c1].status, rows[c1].last_error, rows[c1].finished_at) == (
        "failed",
        "pkg/x:device_not_found",
        now,
    )
    assert (rows[d1].status, rows[d1].attempts, rows[d1].claimed_by) == ("pushing", 1, "w2")


def test_a_failing_mark_rolls_back_the_whole_claim(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outcomes and claim commit together or not at all: nothing is claimed without them."""
    (a1, a2) = _insert(engine, "dev-a", n=2)
    _claim(engine)

    real = outbox.write_marks

    def broken(conn: sa.Connection, marks: Any) -> int:
        real(conn, marks)  # written, then the transaction fails
        raise RuntimeError("connection lost")

    monkeypatch.setattr(outbox, "write_marks", broken)
    mark = outbox.Mark(kind="queued", outbox_id=a1, now=_now(), request_id="r")
    with pytest.raises(RuntimeError):
        outbox.claim_due(engine, worker_id="w1", limit=5, now=_later(), record=[mark])
    monkeypatch.undo()
    assert (_row(engine, a1).status, _row(engine, a2).status) == ("pushing", "pending")


def _event(
    kind: str,
    outbox_id: int | None,
    *,
    error: Any = None,
    correlation_ids: list[str] | None = None,
    seconds: float = 0.0,
) -> dict[str, Any]:
    return {
        "kind": kind,
        "outbox_id": outbox_id,
        "error": error,
        "correlation_ids": correlation_ids or [],
        "time": _now() + timedelta(seconds=seconds),
    }


def _apply(engine: Engine, *events: dict[str, Any]) -> None:
    with engine.begin() as conn:
        outbox.apply_downlink_events(conn, list(events))


FAILED = {
    "namespace": "pkg/networkserver",
    "name": "transmission",
    "message_format": "transmission failed with result `{result}`",
    "attributes": {"result": "TOO_LATE"},
}


TRANSITIONS = [  # (status before, events in order, status after, why)
    ("pushing", ["receive"], "pushing", "a receive is no acceptance (also sent for refusals)"),
    ("pushing", ["forward"], "queued", "forward: the NS accepted it"),
    ("pending", ["forward"], "queued", "accepted although the push timed out"),
    ("queued", ["sent", "ack"], "acked", "the normal confirmed path"),
    ("queued", ["ack", "sent", "forward"], "acked", "late events stay behind"),
    ("sent", ["nack"], "sent", "TTS re-queues a nacked item for another attempt"),
    ("queued", ["nack", "failed"], "failed", "the NS may fail a later retry"),
    ("acked", ["failed", "drop"], "acked", "acked is final"),
    ("failed", ["sent"], "failed", "failed stays"),
    ("failed", ["ack"], "acked", "an ack wins: the device has it"),
    ("pushing", ["drop"], "pushing", "a push-time drop is the HTTP answer's business"),
    ("queued", ["drop"], "dropped", "a later drop"),
    ("sent", ["queue_invalidated"], "invalidated", "invalidated"),
]


def test_events_only_move_statuses_forward(engine: Engine) -> None:
    rows = [
        _insert(engine, f"dev-{i}", status=start)[0]
        for i, (start, _, _, _) in enumerate(TRANSITIONS)
    ]
    for outbox_id, (_, kinds, _, _) in zip(rows, TRANSITIONS, strict=True):
        for i, kind in enumerate(kinds):
            _apply(engine, _event(kind, outbox_id, error=FAILED, seconds=i))
    got = [(why, _row(engine, i).status) for i, (*_, why) in zip(rows, TRANSITIONS, strict=True)]
    assert got == [(why, expected) for _, _, expected, why in TRANSITIONS]


def test_one_batch_with_several_events_ends_in_the_latest_status(engine: Engine) -> None:
    (row,) = _insert(engine, status="pushing")
    _apply(
        engine,
        _event("ack", row, seconds=2),
        _event("forward", row),
        _event("sent", row, seconds=1),
        _event("forward", row),
    )  # replayed duplicate
    r = _row(engine, row)
    assert r.status == "acked"
    assert r.queued_at < r.sent_at < r.acked_at
    assert r.finished_at == r.acked_at


def test_a_late_drop_of_an_earlier_refused_push_does_not_drop_the_queued_row(
    engine: Engine,
) -> None:
    """Attempt 1 was refused (queue full), attempt 2 queued; attempt 1's drop arrives late."""
    (row,) = _insert(engine, status="queued")
    refusal = _event(
        "drop",
        row,
        error=FAILED,
        correlation_ids=[
            "as:downlink:01J",
            f"rpc:/ttn.lorawan.v3.AppAs/DownlinkQueuePush:ingestd-outbox-{row}-1",
        ],
    )
    _apply(engine, refusal)
    assert _row(engine, row).status == "queued"
    _apply(engine, _event("drop", row, error=FAILED, correlation_ids=["as:up:01K"]))
    assert _row(engine, row).status == "dropped"


def test_failed_and_invalidated_events_record_the_error_and_every_row(engine: Engine) -> None:
    failed, inv1, inv2, other = (_insert(engine, f"dev-{i}", status="queued")[0] for i in range(4))
    _apply(
        engine,
        _event("failed", failed, error=FAILED),
        _event(
            "queue_invalidated",
            inv1,
            correlation_ids=["as:downlink:01J", f"ingestd:outbox:{inv1}", f"ingestd:outbox:{inv2}"],
        ),
        _event("sent", None, correlation_ids=["someone-else:7"]),
    )
    r = _row(engine, failed)
    assert r.status == "failed"
    assert r.last_error == (
        "failed: pkg/networkserver:transmission: transmission failed with result `TOO_LATE`"
    )
    assert [_row(engine, i).status for i in (inv1, inv2, other)] == [
        "invalidated",
        "invalidated",
        "queued",
    ]


def test_accepted_per_events_ignores_a_lone_receive_once_settled(engine: Engine) -> None:
    (row,) = _insert(engine)
    e = schema.downlink_events

    def add(kind: str, age_s: float) -> None:
        with engine.begin() as conn:
            conn.execute(
                sa.insert(e).values(
                    event_unique_id=f"{kind}-{age_s}",
                    kind=kind,
                    application_id="app-1",
                    device_id="dev-1",
                    outbox_id=row,
                    time=_now() - timedelta(seconds=age_s),
                )
            )

    assert outbox.accepted_per_events(engine, row, now=_now()) is False
    add("receive", 3600)
    assert outbox.accepted_per_events(engine, row, now=_now()) is False
    add("receive", 1)
    assert outbox.accepted_per_events(engine, row, now=_now()) is None
    add("sent", 0)
    assert outbox.accepted_per_events(engine, row, now=_now()) is True


def test_counts_and_oldest_pending_age(engine: Engine) -> None:
    assert outbox.outbox_counts(engine)["pending"] == 0
    assert outbox.oldest_pending_age_s(engine, _now()) == 0.0
    _insert(engine, "dev-a", n=2)
    _insert(engine, "dev-b", status="acked", created_at=_now() - timedelta(hours=1))
    _insert(engine, "dev-c", created_at=_now() - timedelta(seconds=90))
    counts = outbox.outbox_counts(engine)
    assert (counts["pending"], counts["acked"], counts["failed"]) == (3, 1, 0)
    assert set(counts) == set(schema.OUTBOX_STATUSES)
    assert 89 <= outbox.oldest_pending_age_s(engine, _now()) < 120


# -- rows a hand-written INSERT got wrong -----------------------------------------------------


def test_an_unreadable_row_is_claimed_with_its_problem_not_failing_the_claim(
    engine: Engine,
) -> None:
    """One bad value used to make every claim raise: the whole outbox stopped."""
    (good_before,) = _insert(engine, "dev-good-1")
    bad = {
        insert_unreadable(engine, column, literal, app="app-1", device_id=f"dev-bad-{i}"): reason
        for i, (column, literal, reason) in enumerate(unreadable_values(engine))
    }
    (good_after,) = _insert(engine, "dev-good-2")
    claimed = {i.id: i for i in outbox.claim_due(engine, worker_id="w1", limit=20, now=_later())}
    assert set(claimed) == {good_before, good_after, *bad}
    assert claimed[good_before].problem is None
    assert claimed[good_after].problem is None
    for outbox_id, reason in bad.items():
        assert reason in (claimed[outbox_id].problem or ""), claimed[outbox_id]
        assert claimed[outbox_id].status == "pushing"
    # A stale release reads the rows back the same way (it rewrites next_attempt_at, so
    # that one is readable again); failing one by id works.
    released = outbox.release_stale_claims(engine, older_than=_later(60), now=_now())
    assert {i.id for i in released} == set(claimed)
    assert {i.id for i in released if i.problem} <= set(bad)
    for outbox_id in bad:
        assert outbox.mark_failed(engine, outbox_id, error="invalid row", now=_now())


@pytest.mark.postgres
def test_postgres_claim_walks_the_pending_index_on_a_table_without_statistics(
    pg_url: str,
) -> None:
    """After a bulk insert, before ANALYZE, PostgreSQL planned a bitmap scan and a sort that
    ran the per-device head check on every pending row: 5-8 s per claim on 1M rows."""
    engine = create_engine(pg_url)
    plans: list[str] = []

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _explain(_conn: Any, cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        # EXPLAIN the claim itself, in its own transaction (after its SET LOCALs).
        if statement.lstrip().startswith("WITH claimable"):
            cursor.execute("EXPLAIN " + statement, parameters)
            plans.append("\n".join(r[0] for r in cursor.fetchall()))

    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE downlink_outbox SET (autovacuum_enabled = false)")
            conn.exec_driver_sql(
                "INSERT INTO downlink_outbox (application_id, device_id, f_port, frm_payload) "
                "SELECT 'app-1', 'dev-' || mod(g, 1000), 1, '\\x01'::bytea "
                "FROM generate_series(1, 200000) g"
            )
            analysed = conn.exec_driver_sql(
                "SELECT last_analyze, last_autoanalyze FROM pg_stat_user_tables "
                "WHERE relname = 'downlink_outbox'"
            ).one()
        assert analysed == (None, None)
        started = time.monotonic()
        claimed = outbox.claim_due(engine, worker_id="w1", limit=5, now=_later())
        elapsed = time.monotonic() - started
        assert len(claimed) == 5
        (plan,) = plans
        assert "Index Scan using ix_downlink_outbox_pending_due" in plan, plan
        assert "Sort" not in plan and "Bitmap" not in plan, plan
        assert elapsed < 1.0, f"claim took {elapsed:.3f} s"
    finally:
        engine.dispose()
