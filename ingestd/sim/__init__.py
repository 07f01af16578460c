"""A simulated Things Stack on loopback, for tests, ``ingestd simulate``, the demo and benchmarks.

- :mod:`ingestd.sim.server`: :class:`~ingestd.sim.server.Simulator`, served by uvicorn in a
  thread, scripted by tests (``publish``, ``uplink``, ``restart``, fault attributes).
- :mod:`ingestd.sim.app`: the raw ASGI app (events stream, downlink, storage, rights).
- :mod:`ingestd.sim.store`: the Redis-like event store behind ``after``/``tail`` replay.
- :mod:`ingestd.sim.downlink`, :mod:`ingestd.sim.storage`: the downlink and Storage APIs.
- :mod:`ingestd.sim.fidelity`: what makes it behave like real TTS (rights, h2c, gzip, …).
- :mod:`ingestd.sim.events`: TTS event builders, also used by benchmarks and tests.
- :mod:`ingestd.sim.cli`: ``ingestd simulate`` (its options import nothing of the server).
"""
