"""ingestd: The Things Stack event streams into SQL, and a SQL outbox of downlinks back out."""

__version__ = "0.1.0"
