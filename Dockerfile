# syntax=docker/dockerfile:1
#
# The fedrec image: the `fedrec` binary on a slim Debian, run as a non-root
# user. Build from the repository's root:
#
#   docker build -t fedrec:latest .
#
# Its default command serves a coordinator with /etc/fedrec/coordinator.toml
# (the repository's, or mount one: deploy/k8s/ does, from a ConfigMap) over
# TLS. Any other command works too:
# `docker run fedrec:latest devices --coordinator … --data …`.

# --- build: the release binary only ------------------------------------------
FROM rust:1-slim-bookworm AS build
WORKDIR /src
# ring's build script compiles C; the rest of the tree is pure Rust (the
# protocol is compiled by protox in build.rs, no protoc).
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --package fedrec --bin fedrec \
    && install -D -m 0755 target/release/fedrec /out/fedrec

# --- runtime: the binary, no compiler, no shell tools beyond Debian's base ---
FROM debian:bookworm-slim
RUN groupadd --system --gid 10001 fedrec \
    && useradd --system --uid 10001 --gid fedrec --home-dir /var/lib/fedrec \
       --create-home --shell /usr/sbin/nologin fedrec
COPY --from=build /out/fedrec /usr/local/bin/fedrec
COPY coordinator.toml /etc/fedrec/coordinator.toml
USER 10001:10001
WORKDIR /var/lib/fedrec
# 50051: devices' gRPC (and the gRPC health service); 9100: Prometheus metrics.
EXPOSE 50051 9100
ENTRYPOINT ["/usr/local/bin/fedrec"]
# The default command serves TLS with the certificate and key mounted at
# /etc/fedrec/tls (a kubernetes.io/tls Secret's layout); without them it
# stops with a message naming the missing file. Plain text off loopback
# needs --insecure, behind something that terminates TLS (deploy/k8s).
CMD ["serve", "--config", "/etc/fedrec/coordinator.toml", "--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9100", "--tls-cert", "/etc/fedrec/tls/tls.crt", "--tls-key", "/etc/fedrec/tls/tls.key"]
