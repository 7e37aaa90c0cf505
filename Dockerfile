# syntax=docker/dockerfile:1
#
# authsync container image.
#
#   docker build -t authsync .
#   docker run --rm authsync config                       # print the effective config
#   docker run --rm -e AUTHSYNC_DATABASE_URL=... authsync migrate
#   docker run --rm -e AUTHSYNC_DATABASE_URL=... -e AUTHSYNC_KAFKA_BROKERS=... -p 8080:8080 authsync
#
# The build needs no database: queries are checked against the committed `.sqlx/` metadata
# (SQLX_OFFLINE=true) and the migrations are embedded in the binary.

# ---------------------------------------------------------------- build
FROM rust:1-bookworm AS builder
# librdkafka (rdkafka-sys) is compiled from source: it needs a C toolchain, make, perl,
# zlib and OpenSSL headers (most are already in the rust image; listed for clarity).
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential perl pkg-config libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Everything cargo needs to resolve the workspace: the library, the binary, the
# integration-test target declared in Cargo.toml, the benchmark member (not built), the
# embedded migrations and `.sqlx/`.
COPY Cargo.toml Cargo.lock ./
COPY .sqlx ./.sqlx
COPY migrations ./migrations
COPY src ./src
COPY tests ./tests
COPY bench ./bench
ENV SQLX_OFFLINE=true \
    CARGO_TERM_COLOR=never
# Cache mounts keep the registry and compiled dependencies between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p authsync --bin authsync \
 && install -D -m 0755 target/release/authsync /out/authsync

# ---------------------------------------------------------------- runtime
FROM debian:bookworm-slim AS runtime
# ca-certificates: TLS to Kafka (SASL_SSL) and Postgres (sslmode=require/verify-full).
# libssl3: librdkafka links OpenSSL dynamically.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 65532 authsync \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin authsync
COPY --from=builder /out/authsync /usr/local/bin/authsync
# Example config (every setting with its default); mount your own and pass --config, or
# set AUTHSYNC_* environment variables.
COPY config/authsync.example.toml /etc/authsync/authsync.example.toml
USER 65532:65532
# No AUTHSYNC_* defaults are baked in: environment variables override a mounted config
# file, so setting them here would silently win over it.
# /metrics, /healthz, /readyz
EXPOSE 8080
# SIGTERM starts the drain (see docs/OPERATIONS.md#shutdown-and-drain).
STOPSIGNAL SIGTERM
ENTRYPOINT ["authsync"]
CMD ["run"]
