# sidebus container image: the daemon and the admin CLI in one binary.
# Build:  docker build -t sidebus .
# Run as a Kubernetes sidecar: see deploy/kubernetes/ (the socket is shared with the app
# container through an emptyDir volume mounted at /run/sidebus).

FROM rust:1.95-bookworm AS build
WORKDIR /src
# The dependencies first, in a layer of their own that only a change of the manifests or the
# lock file rebuilds: every workspace member's manifest (scripts/check-deploy.sh checks the
# list against Cargo.toml) with stub sources, built once and the stubs removed.
COPY Cargo.toml Cargo.lock ./
COPY protocol/Cargo.toml protocol/
COPY clients/rust/Cargo.toml clients/rust/
COPY bench/Cargo.toml bench/
RUN mkdir -p src protocol/src clients/rust/src bench/src \
 && touch src/lib.rs protocol/src/lib.rs clients/rust/src/lib.rs \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > bench/src/main.rs \
 && cargo build --release --locked --bin sidebus \
 && rm -rf src protocol/src clients/rust/src bench/src
COPY . .
# COPY keeps the files' times, which may be older than the stubs' build: touch the workspace's
# crate roots so that cargo rebuilds them from the real sources.
RUN touch src/lib.rs src/main.rs protocol/src/lib.rs clients/rust/src/lib.rs \
 && cargo build --release --locked --bin sidebus \
 && strip target/release/sidebus

FROM debian:bookworm-slim
# ca-certificates: the system's roots, for rediss:// and Postgres TLS without a private CA.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 sidebus \
 && useradd --system --uid 10001 --gid sidebus --home-dir /var/lib/sidebus --shell /usr/sbin/nologin sidebus \
 && install -d -o sidebus -g sidebus -m 0750 /var/lib/sidebus \
 && install -d -o sidebus -g sidebus -m 0755 /run/sidebus
COPY --from=build /src/target/release/sidebus /usr/local/bin/sidebus
USER sidebus:sidebus
ENV SIDEBUS_SOCKET=/run/sidebus/sidebus.sock \
    SIDEBUS_DATA_DIR=/var/lib/sidebus \
    SIDEBUS_LOG_FORMAT=json
VOLUME ["/run/sidebus", "/var/lib/sidebus"]
# /metrics, /healthz, /readyz when SIDEBUS_METRICS_ADDR is set (e.g. 0.0.0.0:9464).
EXPOSE 9464
# Healthy while the socket accepts and the daemon answers, whatever Redis and Postgres do:
# publishes are spooled while they are away. (Kubernetes ignores this; deploy/kubernetes/ has
# the same check as its probes.)
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/sidebus", "health", "--socket-only"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sidebus"]
CMD ["run"]
