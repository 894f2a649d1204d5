# syntax=docker/dockerfile:1
#
# Postwire image: both binaries, `management-service` (package `management`) and
# `site-mailer` (package `site-mailer`), on a minimal non-root runtime image.
#
#   docker build -t postwire:0.1.0 .
#   docker run --rm -p 8080:8080 -e POSTWIRE_LISTEN=0.0.0.0:8080 postwire:0.1.0
#   docker run --rm --entrypoint site-mailer postwire:0.1.0      # the site mailer
#
# The Helm chart (helm/postwire) runs `management-service serve` / `migrate` and
# `site-mailer` from this image, as UID 65532 with a read-only root filesystem.
#
# Dependencies are compiled in their own layer (cargo-chef): a change to the project's
# sources rebuilds only the workspace crates, not the dependency tree.

ARG RUST_VERSION=1.95

# ---- toolchain + cargo-chef ------------------------------------------------------------
# Debian 13 (trixie) for building and at runtime, so the glibc matches. The full rust
# image carries the C toolchain that aws-lc-sys and the bundled SQLite compile with.
FROM rust:${RUST_VERSION}-trixie AS chef
RUN cargo install cargo-chef --locked
WORKDIR /src

# ---- the dependency recipe: Cargo.toml/Cargo.lock files only ---------------------------
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# ---- build ---------------------------------------------------------------------------
FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# Cached layer: rebuilt only when a manifest or Cargo.lock changes.
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bin management-service --bin site-mailer \
 && mkdir -p /out/bin /out/state \
 && cp target/release/management-service target/release/site-mailer /out/bin/

# ---- runtime ---------------------------------------------------------------------------
# distroless cc: glibc, libgcc, CA certificates, no shell, no package manager; the
# `nonroot` variant runs as UID/GID 65532.
FROM gcr.io/distroless/cc-debian13:nonroot AS runtime
LABEL org.opencontainers.image.title="postwire" \
      org.opencontainers.image.description="Postwire multi-tenant email backend: management-service and site-mailer" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/bin/ /usr/local/bin/
# State directory (POSTWIRE_DATA_DIR): a volume in Kubernetes; owned by the runtime user.
COPY --from=builder --chown=65532:65532 /out/state /var/lib/postwire
ENV POSTWIRE_DATA_DIR=/var/lib/postwire
WORKDIR /var/lib/postwire
USER 65532:65532
# 8080: management-service; 8025: site-mailer (each listens on 127.0.0.1 unless
# POSTWIRE_LISTEN says otherwise, as the chart does).
EXPOSE 8080 8025
ENTRYPOINT ["/usr/local/bin/management-service"]
CMD ["serve"]
