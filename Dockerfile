# crier container image: docs/deployment.md, "Docker image".
#
# Build: docker build -t crier:dev .
# Run:   docker run --rm -p 8080:8080 -e CRIER_REDIS__URL=redis://host:6379 crier:dev
#        (no configuration file needed: every key can come from CRIER_* variables;
#        mount one and set CRIER_CONFIG=/etc/crier/crier.toml, or pass --config)

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /build

# Build the dependencies alone against placeholder sources, so this layer is
# reused until Cargo.toml or Cargo.lock changes. The placeholder lib.rs is
# empty, so nothing include_str!s src/demo.html at this stage. Same command
# as the real build below (release, --locked, default features), or cargo
# would rebuild the dependencies with other settings.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# The real sources (src/demo.html included). Touch the crate roots so cargo
# sees them as newer than the placeholder build and compiles them again.
# Default features, like `cargo test` in CI.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && objcopy --compress-debug-sections=zlib target/release/crier /crier \
    && test -n "$(/crier --version)"
# The release profile keeps line tables (file:line in panic backtraces);
# objcopy compresses them (about 58 MB -> 21 MB) without losing them. The
# last line proves this is crier, not the placeholder (which prints nothing).

# Distroless: glibc, libgcc and CA certificates; no shell, no package manager.
# crier writes no file: it runs with a read-only root filesystem.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="crier" \
      org.opencontainers.image.description="Event gateway: Redis pub/sub to browsers over WebSocket and SSE" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /crier /usr/local/bin/crier
# Numeric (the distroless "nonroot" user), so Kubernetes runAsNonRoot can
# verify it without reading /etc/passwd.
USER 65532:65532
# HTTP, WebSocket, SSE, /healthz, /readyz and /metrics: one port.
EXPOSE 8080
# No HEALTHCHECK: there is no shell or HTTP client in the image, and the
# orchestrator probes /healthz and /readyz itself.
# crier drains on SIGTERM (shutdown.grace + shutdown.drain, 15 s by default),
# then exits 0: give it a stop timeout longer than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/crier"]
