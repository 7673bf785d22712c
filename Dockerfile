# Build: docker build -t crier .
# Run:   docker run -p 8080:8080 -e CRIER_REDIS__URL=redis://host:6379 crier

FROM rust:1.95-bookworm AS builder
WORKDIR /build

# Build the dependencies alone against placeholder sources, so this layer is
# reused until Cargo.toml or Cargo.lock changes. The placeholder lib.rs is
# empty, so nothing include_str!s src/demo.html at this stage.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

# The real sources. Touch the crate roots so cargo sees them as newer than
# the placeholder build and compiles them again.
COPY src ./src
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked

# Distroless: glibc and CA certificates, no shell, non-root (uid 65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /build/target/release/crier /usr/local/bin/crier
ENV CRIER_LOG__FORMAT=json
# Numeric, so Kubernetes runAsNonRoot can verify it.
USER 65532:65532
EXPOSE 8080
# crier drains on SIGTERM (shutdown.grace + shutdown.drain), then exits.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/crier"]
