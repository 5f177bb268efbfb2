# sidebus container image: the daemon and the admin CLI in one binary.
# Build:  docker build -t sidebus .
# Run as a Kubernetes sidecar: see deploy/kubernetes/sidecar.yaml (the socket is shared with the
# app container through an emptyDir volume mounted at /run/sidebus).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin sidebus \
 && strip target/release/sidebus

FROM debian:bookworm-slim
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
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/sidebus"]
CMD ["run"]
