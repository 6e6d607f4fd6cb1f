# The aggregator's container image: wheels built in a builder stage, a slim runtime without
# compilers or build tools, a non-root user, tini as PID 1.
#   docker build -t aggregator .
#   docker run -p 24224:24224 -p 24224:24224/udp -p 8888:8888 -e SEARCH_STREAM=... aggregator
# BASE is any Debian-based image with Python 3.11+ and its venv module.
ARG BASE=python:3.12-slim-bookworm

FROM ${BASE} AS builder
WORKDIR /src
RUN python3 -m venv /opt/aggregator
COPY pyproject.toml README.md ./
COPY aggregator ./aggregator
# Wheels first (ours and every dependency), then an install from them alone: what the runtime
# gets is exactly what was built here, without pip (nothing is installed at run time).
RUN /opt/aggregator/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/aggregator/bin/pip wheel --no-cache-dir --wheel-dir /wheels . \
 && /opt/aggregator/bin/pip install --no-cache-dir --no-index --find-links /wheels aggregator \
 && /opt/aggregator/bin/pip uninstall --yes pip setuptools

FROM ${BASE}
# tini: a PID 1 that forwards SIGTERM to the supervisor and reaps any orphaned process.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 aggregator \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/aggregator \
      --shell /usr/sbin/nologin aggregator \
 && mkdir -p /var/lib/aggregator/dead-letter \
 && chown -R aggregator:aggregator /var/lib/aggregator
COPY --from=builder /opt/aggregator /opt/aggregator
COPY conf/ /etc/aggregator/
ENV PATH=/opt/aggregator/bin:$PATH \
    AGGREGATOR_CONFIG=/etc/aggregator/fargate.toml \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /var/lib/aggregator
EXPOSE 24224/tcp 24224/udp 8888/tcp
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
  CMD ["aggregator", "health"]
ENTRYPOINT ["/usr/bin/tini", "--", "aggregator"]
CMD ["run"]
