# Build stage: a release binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY migrations ./migrations
RUN cargo build --release --locked && strip target/release/churnzero-forwarder

# Runtime stage: the binary alone, running as an unprivileged user; the
# outbox lives on the /data volume so acknowledged events survive upgrades.
FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --home /data forwarder && mkdir -p /data && chown forwarder /data
COPY --from=build /src/target/release/churnzero-forwarder /usr/local/bin/churnzero-forwarder
USER forwarder
WORKDIR /data
VOLUME ["/data"]
ENV FORWARDER_LISTEN=0.0.0.0:8080 \
    FORWARDER_DATABASE=/data/churnzero-forwarder.db
EXPOSE 8080
# SIGTERM drains in-flight requests; give it longer than --request-timeout.
STOPSIGNAL SIGTERM
ENTRYPOINT ["churnzero-forwarder"]
CMD ["serve"]
