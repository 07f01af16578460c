"""The downlink worker against the loopback TTS simulator, on SQLite and PostgreSQL: what a
user sees in downlink_outbox after inserting a row, for success, refusals, crashes and
several workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from outbox_rows import insert_unreadable, unreadable_values
from sqlalchemy.engine import Engine
from structlog.testing import capture_logs
from support import wait_for

from ingestd import __version__, schema
from ingestd.batch import BatchBuilder
from ingestd.config import DownlinkSettings, Settings, TtsSettings
from ingestd.db import create_engine
from ingestd.models import Cursor
from ingestd.outbox import sql as outbox
from ingestd.outbox.worker import DownlinkWorker
from ingestd.secrets import Secret
from ingestd.sim.server import Simulator
from ingestd.sim.store import SimError
from ingestd.store import Store

T = schema.downlink_outbox
APP = "sim-app"
WAIT_S = 10.0


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(application_id=APP, devices=5, downlink_ack_delay_s=0.05, seed=7) as s:
        yield s


def settings_for(sim: Simulator, **downlinks: Any) -> Settings:
    return Settings(
        tts=TtsSettings(base_url=sim.base_url, api_key=Secret(sim.api_key)),
        downlinks=downlink_settings(**downlinks),
    )


def downlink_settings(**downlinks: Any) -> DownlinkSettings:
    values: dict[str, Any] = {
        "enabled": True,
        "poll_interval_s": 0.05,
        "max_attempts": 4,
        "retry_base_s": 0.05,
        "retry_max_s": 0.2,
        "request_timeout_s": 2.0,
        "shutdown_grace_s": 1.0,
        "require_stream": False,
        "stale_claim_s": 30.0,
    } | downlinks
    return DownlinkSettings(**values)


def insert(engine: Engine, device_id: str = "dev-0001", n: int = 1, **values: Any) -> list[int]:
    row = {"application_id": APP, "device_id": device_id, "f_port": 5, "frm_payload": b"\x01"}
    with engine.begin() as conn:
        return [
            conn.execute(sa.insert(T).values(row | values).returning(T.c.id)).scalar_one()
            for _ in range(n)
        ]


def row(engine: Engine, outbox_id: int) -> Any:
    with engine.connect() as conn:
        return conn.execute(sa.select(T).where(T.c.id == outbox_id)).one()


def statuses(engine: Engine) -> dict[int, str]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(T.c.id, T.c.status)).all())  # type: ignore[arg-type]


def settled(engine: Engine, *wanted: str) -> Callable[[], bool]:
    return lambda: all(s in wanted for s in statuses(engine).values())


def pushes(sim: Simulator) -> list[Any]:
    return [r for r in sim.downlink_requests if r.op in ("push", "replace")]


def ingest(sim: Simulator, engine: Engine) -> None:
    """Store the simulator's events as the stream consumer would, with the outbox hook."""
    builder = BatchBuilder("test", Cursor())
    for event in list(sim.events):
        builder.add_event(event)
    Store(engine, downlink_hook=outbox.apply_downlink_events).commit_batch(builder.take())


async def run_until(
    worker: DownlinkWorker, done: Callable[[], bool], timeout_s: float = WAIT_S
) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        deadline = time.monotonic() + timeout_s
        while not await asyncio.to_thread(done):
            if task.done():
                task.result()
                raise AssertionError("worker stopped early")
            assert time.monotonic() < deadline, "timed out waiting for the outbox"
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5.0)


async def run_for(worker: DownlinkWorker, seconds: float) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    await asyncio.sleep(seconds)  # a window in which it must do nothing (or nothing more)
    assert not task.done()
    stop.set()
    await asyncio.wait_for(task, 5.0)


def worker(engine: Engine, settings: Settings, **kw: Any) -> DownlinkWorker:
    return DownlinkWorker(engine, settings, worker_id=kw.pop("worker_id", "test:1"), **kw)


async def test_push_then_stream_events_take_a_row_to_acked(engine: Engine, sim: Simulator) -> None:
    confirmed = insert(
        engine, decoded_payload={"interval": 15}, frm_payload=None, confirmed=True, priority="HIGH"
    )[0]
    plain = insert(engine, "dev-0002", frm_payload=b"\x01\x02")[0]
    await run_until(worker(engine, settings_for(sim)), settled(engine, "queued"))
    sent = {r.device_id: r for r in pushes(sim)}
    body = sent["dev-0001"].body["downlinks"][0]
    assert body == {
        "f_port": 5,
        "decoded_payload": {"interval": 15},
        "confirmed": True,
        "priority": "HIGH",
        "correlation_ids": [f"ingestd:outbox:{confirmed}"],
    }
    assert sent["dev-0002"].body["downlinks"][0]["frm_payload"] == "AQI="
    assert sent["dev-0001"].request_id == f"ingestd-outbox-{confirmed}-1"
    assert sent["dev-0001"].headers["user-agent"] == f"ingestd/{__version__}"
    assert sent["dev-0001"].headers["authorization"].startswith("Bearer NNSXS.")
    assert row(engine, confirmed).request_id == f"ingestd-outbox-{confirmed}-1"

    deadline = time.monotonic() + WAIT_S  # the simulator transmits and acks within ~0.1 s
    while {row(engine, confirmed).status, row(engine, plain).status} != {"acked", "sent"}:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
        await asyncio.to_thread(ingest, sim, engine)
    r = row(engine, confirmed)
    assert r.status == "acked"
    assert r.queued_at <= r.sent_at <= r.acked_at
    assert row(engine, plain).status == "sent"
    with engine.connect() as conn:
        kinds = conn.execute(
            sa.select(schema.downlink_events.c.kind).where(
                schema.downlink_events.c.outbox_id == confirmed
            )
        ).scalars()
        assert {"receive", "sent", "ack"} <= set(kinds)


INVALID = [
    ({"f_port": 0}, "f_port 0 is outside 1-223"),
    ({"f_port": 224}, "f_port 224 is outside 1-223"),
    ({"frm_payload": b"\x00" * 243}, "frm_payload is 243 bytes"),
    ({"decoded_payload": {"a": 1}}, "exactly one of frm_payload and decoded_payload"),
    ({"frm_payload": None}, "no payload"),
    ({"frm_payload": b""}, "no payload"),
    ({"frm_payload": None, "decoded_payload": [1, 2]}, "must be a JSON object"),
    ({"device_id": "Dev_1"}, "device_id 'Dev_1' is not a TTS id"),
    ({"device_id": "d" * 37}, "is not a TTS id"),
    ({"application_id": "a--b"}, "application_id 'a--b' is not a TTS id"),
]


async def test_invalid_rows_fail_without_calling_tts(engine: Engine, sim: Simulator) -> None:
    ids = [insert(engine, **values)[0] for values, _ in INVALID]
    await run_until(worker(engine, settings_for(sim)), settled(engine, "failed"))
    for outbox_id, (_, reason) in zip(ids, INVALID, strict=True):
        last_error = row(engine, outbox_id).last_error
        assert last_error.startswith("invalid row: ")
        assert reason in last_error
    assert sim.downlink_requests == []


async def test_unreadable_rows_fail_by_id_and_hold_back_nothing(
    engine: Engine, sim: Simulator
) -> None:
    """A value the claim cannot read, a device id with a trailing newline (it passed the id
    check's `$`) or a payload nested deeper than JSON encoders go: each used to stop the
    outbox or cycle one row through verify forever. Each now fails by id with a reason,
    and the good rows around them are pushed once."""
    (good_before,) = insert(engine, "dev-0001")
    reasons: dict[int, str] = {}
    for i, (column, literal, reason) in enumerate(unreadable_values(engine)):
        outbox_id = insert_unreadable(
            engine, column, literal, app=APP, device_id=f"dev-{i + 10:04d}"
        )
        reasons[outbox_id] = reason
    (newline,) = insert(engine, "dev-0003\n")
    reasons[newline] = "device_id 'dev-0003\\n' is not a TTS id"
    deep = '{"a": ' * 300 + "{}" + "}" * 300  # valid JSON; orjson writes at most 254 levels
    (nested,) = insert(engine, "dev-0004")
    cast = "CAST(:deep AS jsonb)" if engine.dialect.name == "postgresql" else ":deep"
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"UPDATE downlink_outbox SET frm_payload = NULL, "
                f"decoded_payload = {cast} WHERE id = :id"
            ),
            {"deep": deep, "id": nested},
        )
    reasons[nested] = "cannot encode the push request"
    (good_after,) = insert(engine, "dev-0002")

    def done() -> bool:
        with engine.connect() as conn:
            rows = conn.execute(sa.select(T.c.id, T.c.status)).all()
        return all(r.status in ("failed", "queued") for r in rows)

    await run_until(worker(engine, settings_for(sim), concurrency=2), done)
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(sa.select(T.c.id, T.c.status, T.c.last_error))}
    for outbox_id, reason in reasons.items():
        assert rows[outbox_id].status == "failed"
        assert rows[outbox_id].last_error.startswith("invalid row: ")
        assert reason in rows[outbox_id].last_error
    assert rows[good_before].status == rows[good_after].status == "queued"
    assert sorted(r.device_id for r in pushes(sim)) == ["dev-0001", "dev-0002"]


async def test_refusals_fail_the_row_with_the_tts_error_name(
    engine: Engine, sim: Simulator
) -> None:
    sim.fail_next_pushes["dev-0001"] = [503] * 9
    cases = {
        insert(engine, device_id="dev-9999")[0]: ("pkg/applicationserver:device_not_found", 1),
        insert(engine, application_id="other-app")[0]: ("pkg/auth/rights:no_application_rights", 1),
        insert(engine, device_id="dev-0001")[0]: ("pkg/cluster:peer_unavailable", 3),
    }
    await run_until(worker(engine, settings_for(sim, max_attempts=3)), settled(engine, "failed"))
    for outbox_id, (error_name, attempts) in cases.items():
        r = row(engine, outbox_id)
        assert r.last_error.startswith(error_name)
        assert r.attempts == attempts
        assert (
            len(
                [
                    p
                    for p in pushes(sim)
                    if p.body["downlinks"][0]["correlation_ids"] == [f"ingestd:outbox:{outbox_id}"]
                ]
            )
            == attempts
        )
    assert r.last_error.endswith("(gave up after 3 attempts)")


async def test_full_device_queue_is_retried_with_backoff_then_failed(
    engine: Engine, sim: Simulator
) -> None:
    sim.downlinks.capacity = 0
    (outbox_id,) = insert(engine)
    await run_until(worker(engine, settings_for(sim, max_attempts=3)), settled(engine, "failed"))
    r = row(engine, outbox_id)
    assert r.last_error.startswith("pkg/networkserver:downlink_queue_capacity")
    assert r.last_error.endswith("(gave up after 3 attempts)")
    assert [q.op for q in sim.downlink_requests] == ["push"] * 3  # clear refusals: no checks


async def test_a_5xx_is_retried_after_checking_the_device_queue(
    engine: Engine, sim: Simulator
) -> None:
    sim.fail_next_pushes["dev-0001"] = [503]
    (outbox_id,) = insert(engine)
    await run_until(worker(engine, settings_for(sim)), settled(engine, "queued"))
    r = row(engine, outbox_id)
    assert (r.attempts, r.verify_before_push) == (2, False)
    assert "pkg/cluster:peer_unavailable" in r.last_error
    assert [q.op for q in sim.downlink_requests] == ["push", "list", "push"]


async def test_rate_limit_waits_for_x_rate_limit_retry_plus_one_second(
    engine: Engine, sim: Simulator
) -> None:
    sim.fail_next_pushes["dev-0001"] = [429]  # answers with X-Rate-Limit-Retry: 1
    (outbox_id,) = insert(engine)
    await run_until(worker(engine, settings_for(sim)), settled(engine, "queued"))
    first, second = pushes(sim)
    assert second.time - first.time >= 1.9
    assert "pkg/ratelimit:rate_limit_exceeded" in row(engine, outbox_id).last_error
    assert [q.op for q in sim.downlink_requests] == ["push", "push"]  # a clear refusal


async def test_outcomes_recorded_together_each_keep_their_own_status(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pushes that finish together have their outcomes recorded in one transaction (with
    the next claim): a refused push among accepted ones still ends `failed` with its reason,
    a 503 goes back to `pending` for a verified retry, and the others end `queued`."""
    devices = [f"dev-{i:04d}" for i in range(1, 7)]
    ids = {d: insert(engine, d)[0] for d in devices}
    refusals = {"dev-0002": SimError("device_not_found"), "dev-0005": SimError("peer_unavailable")}
    arrived: list[str] = []
    all_in = asyncio.Event()

    async def tts_handler(request: httpx.Request) -> httpx.Response:
        device_id = request.url.path.split("/")[-3]
        arrived.append(device_id)
        if len(arrived) == len(devices):
            all_in.set()
        await all_in.wait()  # every push is in flight: they all answer at once
        refusal = refusals.get(device_id)
        if refusal is None:
            return httpx.Response(200, json={})
        return httpx.Response(refusal.status, json=refusal.body)

    batches: list[list[outbox.Mark]] = []
    real_claim = outbox.claim_due

    def recorded_claim(*args: Any, **kwargs: Any) -> Any:
        batches.append(list(kwargs.get("record", ())))
        return real_claim(*args, **kwargs)

    monkeypatch.setattr(outbox, "claim_due", recorded_claim)
    settings = Settings(
        tts=TtsSettings(base_url="http://tts.invalid", api_key=Secret("NNSXS.X.Y")),
        downlinks=downlink_settings(retry_base_s=30.0, retry_max_s=60.0),
    )
    client = httpx.AsyncClient(transport=httpx.MockTransport(tts_handler))
    try:
        w = worker(engine, settings, client=client, concurrency=8)
        await run_until(
            w, lambda: len(arrived) == len(devices) and "pushing" not in statuses(engine).values()
        )
    finally:
        await client.aclose()
    assert sorted(arrived) == devices  # each pushed once
    by_batch = {len(b) for b in batches}
    assert len(devices) in by_batch, batches  # all six outcomes in one transaction
    for device_id, outbox_id in ids.items():
        r = row(engine, outbox_id)
        if device_id == "dev-0002":
            assert (r.status, r.attempts) == ("failed", 1)
            assert r.last_error.startswith("pkg/applicationserver:device_not_found")
            assert r.finished_at is not None
        elif device_id == "dev-0005":
            assert (r.status, r.attempts, r.verify_before_push) == ("pending", 1, True)
            assert r.last_error.startswith("pkg/cluster:peer_unavailable")
        else:
            assert (r.status, r.attempts) == ("queued", 1)
            assert r.request_id == f"ingestd-outbox-{outbox_id}-1"
            assert r.last_error is None


async def test_rejected_key_fails_rows_logs_once_and_never_logs_the_key(
    engine: Engine, sim: Simulator
) -> None:
    real_key = sim.api_key
    insert(engine, "dev-0001")
    insert(engine, "dev-0002")
    wrong = sim.api_key[:-4] + "AAAA"
    settings = Settings(
        tts=TtsSettings(base_url=sim.base_url, api_key=Secret(wrong)),
        downlinks=settings_for(sim).downlinks,
    )
    with capture_logs() as logs:
        await run_until(worker(engine, settings), settled(engine, "failed"))
    assert all("invalid_authorization" in row(engine, i).last_error for i in statuses(engine))
    assert sum(1 for e in logs if e["event"] == "downlink_auth_rejected") == 1
    assert real_key not in repr(logs)
    assert wrong not in repr(logs)


@pytest.mark.parametrize(
    "granted",
    [
        ["RIGHT_APPLICATION_TRAFFIC_READ"],
        ["RIGHT_APPLICATION_INFO", "RIGHT_APPLICATION_DEVICES_READ"],
    ],
)
async def test_a_key_without_the_downlink_right_fails_rows_with_the_tts_error_name(
    engine: Engine, sim: Simulator, granted: list[str]
) -> None:
    """TTS answers a push with 403 insufficient_application_rights (issue 11): the row fails
    at once naming it, and nothing else is retried against a key that cannot push."""
    read_only = sim.add_api_key(granted)
    ids = insert(engine, "dev-0001") + insert(engine, "dev-0002")
    settings = Settings(
        tts=TtsSettings(base_url=sim.base_url, api_key=Secret(read_only)),
        downlinks=settings_for(sim).downlinks,
    )
    with capture_logs() as logs:
        await run_until(worker(engine, settings), settled(engine, "failed"))
    for outbox_id in ids:
        r = row(engine, outbox_id)
        assert r.last_error.startswith("pkg/auth/rights:insufficient_application_rights"), r
        assert "RIGHT_APPLICATION_TRAFFIC_DOWN_WRITE" in r.last_error  # attributes.missing
        assert r.attempts <= 1
    assert all(p.status == 403 for p in pushes(sim))
    assert len(pushes(sim)) <= len(ids)
    assert sim.queue("dev-0001") == [] and sim.queue("dev-0002") == []
    assert read_only not in repr(logs)


def crash_before_marking_queued(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process dies after TTS accepted a push, before its `queued` is committed."""
    real_write = outbox.write_marks

    def write_marks(conn: sa.Connection, marks: Any) -> int:
        marks = list(marks)
        if any(m.kind == "queued" for m in marks):
            raise RuntimeError("killed between push and mark")
        return real_write(conn, marks)

    monkeypatch.setattr(outbox, "write_marks", write_marks)


async def test_crash_after_push_is_verified_not_pushed_again(
    engine: Engine, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Push done, row left `pushing` (the process died before recording the answer)."""
    sim.downlinks.ack_delay_s = 60.0  # the item stays in the device queue
    (outbox_id,) = insert(engine)
    crash_before_marking_queued(monkeypatch)
    await run_until(worker(engine, settings_for(sim)), lambda: len(pushes(sim)) == 1)
    assert row(engine, outbox_id).status == "pushing"
    monkeypatch.undo()
    # The restarted process (same worker id) takes its own claim back once no request of
    # its previous life can still be in flight (3 request timeouts: verify, push, marks).
    await asyncio.sleep(0.35)  # the time passing is the point: 3 x 0.1 s request timeouts
    await run_until(
        worker(engine, settings_for(sim, request_timeout_s=0.1)), settled(engine, "queued")
    )
    assert len(pushes(sim)) == 1
    assert [q.op for q in sim.downlink_requests] == ["push", "list"]
    assert row(engine, outbox_id).attempts == 2


async def test_crash_after_push_then_events_while_down_is_not_pushed_again(
    engine: Engine, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    (outbox_id,) = insert(engine)
    crash_before_marking_queued(monkeypatch)
    await run_until(worker(engine, settings_for(sim)), lambda: len(pushes(sim)) == 1)
    monkeypatch.undo()
    deadline = time.monotonic() + WAIT_S  # the device got it; the stream stored the events
    while sim.queue("dev-0001") or not any(
        e["name"] == "as.down.data.sent.forward" for e in sim.events
    ):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    await asyncio.to_thread(ingest, sim, engine)
    assert row(engine, outbox_id).status == "sent"
    await run_for(worker(engine, settings_for(sim, stale_claim_s=0.01)), 0.5)
    assert len(pushes(sim)) == 1
    assert row(engine, outbox_id).status == "sent"


async def test_claim_without_push_is_pushed_once_after_the_claim_expires(
    engine: Engine, sim: Simulator
) -> None:
    """A worker died after claiming, before pushing: TTS has nothing, so it goes out once."""
    (outbox_id,) = insert(engine)
    outbox.claim_due(engine, worker_id="dead:1", limit=1, now=datetime.now(UTC))
    await asyncio.sleep(0.3)  # the time passing is the point: the claim outlives stale_claim_s
    await run_until(worker(engine, settings_for(sim, stale_claim_s=0.2)), settled(engine, "queued"))
    assert [q.op for q in sim.downlink_requests] == ["list", "push"]
    assert row(engine, outbox_id).attempts == 2


async def test_pushes_wait_for_a_connected_stream(engine: Engine, sim: Simulator) -> None:
    ready = False
    (outbox_id,) = insert(engine)
    w = worker(engine, settings_for(sim, require_stream=True), stream_ready=lambda a, d: ready)
    await run_for(w, 0.5)
    assert sim.downlink_requests == []
    r = row(engine, outbox_id)
    assert (r.status, r.attempts) == ("pending", 0)
    assert "waiting for a connected event stream" in r.last_error
    ready = True
    w = worker(engine, settings_for(sim, require_stream=True), stream_ready=lambda a, d: ready)
    await run_until(w, settled(engine, "queued"), timeout_s=5.0)


async def test_two_workers_push_each_row_once_in_device_order(db_url: str, sim: Simulator) -> None:
    engines = [create_engine(db_url) for _ in range(2)]
    try:
        with engines[0].begin() as conn:
            rows = [
                {
                    "application_id": APP,
                    "device_id": sim.device_ids[i % 5],
                    "f_port": 1,
                    "frm_payload": i.to_bytes(2, "big"),
                }
                for i in range(200)
            ]
            conn.execute(sa.insert(T), rows)
        settings = settings_for(sim)
        workers = [
            worker(e, settings, worker_id=f"w{k}", concurrency=2) for k, e in enumerate(engines)
        ]
        stop = asyncio.Event()
        tasks = [asyncio.create_task(w.run(stop)) for w in workers]
        deadline = time.monotonic() + 20
        while not await asyncio.to_thread(settled(engines[0], "queued")):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5.0)
        ids = [
            int(p.body["downlinks"][0]["correlation_ids"][0].rpartition(":")[2])
            for p in pushes(sim)
        ]
        assert sorted(ids) == sorted(statuses(engines[0]))  # every row exactly once
        for device in sim.device_ids:
            per_device = [i for p, i in zip(pushes(sim), ids, strict=True) if p.device_id == device]
            assert per_device == sorted(per_device)
        assert all(w.pushes > 0 for w in workers)
    finally:
        for e in engines:
            e.dispose()


@pytest.mark.postgres
async def test_postgres_notify_wakes_an_idle_worker_at_once(pg_url: str, sim: Simulator) -> None:
    engine = create_engine(pg_url)
    try:
        w = worker(engine, settings_for(sim, poll_interval_s=5.0))
        stop = asyncio.Event()
        task = asyncio.create_task(w.run(stop))
        await wait_for(lambda: _listening(engine), timeout_s=5, what="the worker's LISTEN")
        (outbox_id,) = await asyncio.to_thread(insert, engine)
        inserted = time.monotonic()
        while row(engine, outbox_id).status != "queued":
            assert time.monotonic() - inserted < 1.0, "NOTIFY did not wake the worker"
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 5.0)
    finally:
        engine.dispose()


def _listening(engine: Engine) -> bool:
    """Some session of this test's database is idle in LISTEN (the worker's listener)."""
    with engine.connect() as conn:
        n = conn.execute(
            sa.text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND state = 'idle' AND query LIKE 'LISTEN %'"
            )
        ).scalar_one()
    return bool(n)


def _slow_tts(delay_s: float, called: asyncio.Event) -> httpx.AsyncClient:
    async def handler(request: httpx.Request) -> httpx.Response:
        called.set()
        await asyncio.sleep(delay_s)
        return httpx.Response(200, json={}, headers=[("X-Warning", "field x is deprecated")])

    return httpx.AsyncClient(transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(("push_s", "expected"), [(0.3, "queued"), (5.0, "pushing")])
async def test_stop_lets_a_push_finish_within_the_grace_else_leaves_it_pushing(
    engine: Engine, push_s: float, expected: str
) -> None:
    called = asyncio.Event()
    settings = Settings(
        tts=TtsSettings(base_url="http://tts.invalid", api_key=Secret("NNSXS.X.Y")),
        downlinks=DownlinkSettings(
            enabled=True,
            poll_interval_s=0.05,
            shutdown_grace_s=0.5,
            require_stream=False,
            request_timeout_s=10.0,
        ),
    )
    async with _slow_tts(push_s, called) as client:
        (outbox_id,) = insert(engine)
        w = worker(engine, settings, client=client)
        stop = asyncio.Event()
        with capture_logs() as logs:
            task = asyncio.create_task(w.run(stop))
            await asyncio.wait_for(called.wait(), 5.0)
            stop.set()
            started = time.monotonic()
            await asyncio.wait_for(task, 5.0)
        assert time.monotonic() - started < 0.5 + 0.5
    assert row(engine, outbox_id).status == expected
    warnings = [e for e in logs if e["event"] == "tts_warning"]
    assert len(warnings) == (1 if expected == "queued" else 0)


async def test_an_idle_worker_stops_within_half_a_second(
    engine: Engine, sim: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    claims: list[object] = []
    real_claim = outbox.claim_due

    def recorded_claim(*args: Any, **kwargs: Any) -> Any:
        claims.append(result := real_claim(*args, **kwargs))
        return result

    monkeypatch.setattr(outbox, "claim_due", recorded_claim)
    w = worker(engine, settings_for(sim, poll_interval_s=5.0))
    stop = asyncio.Event()
    task = asyncio.create_task(w.run(stop))
    await wait_for(lambda: bool(claims), timeout_s=5, what="the first (empty) claim")
    stop.set()
    started = time.monotonic()
    await asyncio.wait_for(task, 2.0)
    assert time.monotonic() - started < 0.5


async def test_rows_claimed_ahead_are_given_back_untouched_at_stop(engine: Engine) -> None:
    """The worker claims up to `concurrency` rows ahead of the ones in flight; at stop those
    were never pushed, so they go back to `pending` with the attempt not counted."""
    called = asyncio.Event()
    ids = [insert(engine, f"dev-{i:04d}")[0] for i in range(1, 9)]
    settings = Settings(
        tts=TtsSettings(base_url="http://tts.invalid", api_key=Secret("NNSXS.X.Y")),
        downlinks=downlink_settings(shutdown_grace_s=0.2, request_timeout_s=10.0),
    )
    async with _slow_tts(5.0, called) as client:
        w = worker(engine, settings, client=client, concurrency=2)
        stop = asyncio.Event()
        task = asyncio.create_task(w.run(stop))
        await asyncio.wait_for(called.wait(), 5.0)
        await wait_for(
            lambda: sum(row(engine, i).status == "pushing" for i in ids) == 4,
            timeout_s=5,
            what="2 rows in flight and 2 claimed ahead",
        )
        stop.set()
        await asyncio.wait_for(task, 5.0)
    rows = [row(engine, i) for i in ids]
    assert w.pushes == 2
    assert sum(r.status == "pushing" for r in rows) == 2  # abandoned mid-push: reconciled later
    for r in rows:
        if r.status != "pushing":
            assert (r.status, r.attempts, r.claimed_by) == ("pending", 0, None)
