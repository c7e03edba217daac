# syntax=docker/dockerfile:1
# The one spillway binary (controller, router, engine-sim, crdgen) on a distroless base.
#   docker build -t spillway:dev .
# The build is CI's: `cargo build --release --locked` with the toolchain of Cargo.toml's
# rust-version, so the image runs the code CI tested.

ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY e2e ./e2e
# Cache the registry and target dir between builds (BuildKit); copy the binary out of the cache.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin spillway \
 && install -D -m 0755 target/release/spillway /out/spillway

# glibc + libgcc, no shell, no package manager; user 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="spillway" \
      org.opencontainers.image.description="Kubernetes operator for self-hosted GPU inference, with burst to OpenAI-compatible providers" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/spillway-dev/spillway"
COPY --from=build /out/spillway /usr/local/bin/spillway
USER 65532:65532
# 8080: controller /metrics, /healthz, /readyz; 8000: engine-sim.
EXPOSE 8080 8000
ENTRYPOINT ["/usr/local/bin/spillway"]
CMD ["--help"]
