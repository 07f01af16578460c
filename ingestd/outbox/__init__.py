"""The downlink outbox: rows an application writes, pushed to TTS and tracked to the device.

- :mod:`ingestd.outbox.ids`: the ids ingestd puts on a push and finds again in events.
- :mod:`ingestd.outbox.sql`: all outbox SQL (claims, outcome marks, event-driven status).
- :mod:`ingestd.outbox.rules`: pure rules: row validation, TTS requests, answer verdicts.
- :mod:`ingestd.outbox.worker`: :class:`~ingestd.outbox.worker.DownlinkWorker`, the loop.
"""
