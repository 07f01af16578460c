# syntax=docker/dockerfile:1
# ingestd container image.
#
#   docker build -t ingestd .
#   docker run --rm -v ./ingestd.toml:/etc/ingestd/ingestd.toml:ro -v ingestd-data:/var/lib/ingestd \
#       -e TTS_API_KEY -p 9464:9464 ingestd
#
# The config file is mounted at /etc/ingestd/ingestd.toml (required: it names the streams).
# With the default [database] url "sqlite:///ingestd.db" the SQLite file lands in the working
# directory /var/lib/ingestd, a volume; for PostgreSQL set INGESTD_DATABASE__URL or the url in
# the file. The spool ([spool], frames kept while the database stalls) lives on the same volume:
# /var/lib/ingestd/ingestd.db-spool with SQLite, /var/lib/ingestd/ingestd-spool otherwise.
# The API key comes from ${TTS_API_KEY} in the file, or from a docker secret with
# api_key_file = "/run/secrets/tts_api_key" (see config/docker-compose.example.yml).
# The ENV values below override the file (INGESTD_<SECTION>__<KEY> beats TOML); override them
# with -e to change them.

ARG PYTHON_IMAGE=python:3.11-slim

# ---- builder: ingestd and every dependency as wheels --------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# Only what the wheel is built from (hatchling: pyproject, readme, the package, migrations).
COPY pyproject.toml README.md requirements.lock ./
COPY ingestd ./ingestd
COPY migrations ./migrations
# Dependencies pinned by the lockfile, so an image rebuilt later has the same versions.
RUN pip wheel --wheel-dir /wheels --constraint requirements.lock .

# ---- runtime: the wheels installed, nothing else ------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="ingestd" \
      org.opencontainers.image.description="The Things Stack event streams into SQL, and a SQL outbox of downlinks back out" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A fixed, unprivileged uid/gid so volume ownership is predictable across image versions.
RUN groupadd --system --gid 10001 ingestd \
 && useradd --system --uid 10001 --gid ingestd --no-create-home \
        --home-dir /var/lib/ingestd --shell /usr/sbin/nologin ingestd \
 && install -d -o ingestd -g ingestd -m 0750 /var/lib/ingestd \
 && install -d -m 0755 /etc/ingestd

# Offline install from the builder's wheels; the bind mount keeps them out of the image layers.
# Migrations ship inside the wheel (ingestd/_migrations), so `ingestd migrate` works anywhere.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels ingestd \
 && ingestd --version

# No INGESTD_DATABASE__URL here on purpose: it would silently beat the url in a mounted config.
ENV INGESTD_CONFIG=/etc/ingestd/ingestd.toml \
    INGESTD_LOGGING__FORMAT=json \
    INGESTD_METRICS__LISTEN=0.0.0.0:9464

WORKDIR /var/lib/ingestd
VOLUME ["/var/lib/ingestd", "/etc/ingestd"]
EXPOSE 9464

# slim has no curl: ask /healthz with the stdlib (any non-2xx raises, so exit status 1), on the
# port from INGESTD_METRICS__LISTEN. With the endpoint disabled (INGESTD_METRICS__LISTEN=""),
# run with --no-healthcheck, or the container reports unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('INGESTD_METRICS__LISTEN', ':9464').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]

USER 10001:10001
STOPSIGNAL SIGTERM
# Exec form: ingestd is PID 1 and receives SIGTERM itself (graceful stop within a second).
ENTRYPOINT ["ingestd"]
CMD ["run"]
