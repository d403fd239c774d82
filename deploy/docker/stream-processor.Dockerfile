# syntax=docker/dockerfile:1.7
# The stream processor: readings topic -> gRPC Predict on the model server -> scores,
# anomalies and dead-letter topics.
#
#   docker build -f deploy/docker/stream-processor.Dockerfile -t vigil/stream-processor:dev .
#
# Built from the repository root (the whole workspace is the build context; .dockerignore
# keeps target/ and .git out). Every service Dockerfile shares the builder stage below
# word for word except for CRATE; deploy/check_deploy.py checks that.

# ---- builder: the workspace's toolchain, one crate, release profile ----------------------
# rust:<version>-bookworm is Debian 12 with the C toolchain (gcc, make), libssl-dev and
# zlib1g-dev: what rdkafka's bundled librdkafka (its own ./configure + make, `ssl`
# feature), openssl-sys and libz-sys need. protoc is vendored by shared/proto.
# 1.95.0 is the toolchain CI uses; the workspace's rust-version is 1.91.
ARG RUST_IMAGE=rust:1.95.0-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
FROM ${RUST_IMAGE} AS builder
ARG CRATE=stream-processor
WORKDIR /src
# zlib is compiled into the binary (libz-sys honours this), so the runtime image needs no
# libz; OpenSSL stays dynamic and comes from the runtime image, patched with it.
ENV LIBZ_SYS_STATIC=1 \
    CARGO_TERM_COLOR=never
COPY . .
# Cache mounts: the registry and the target directory survive between builds (and are
# shared by every service's Dockerfile, so the second image reuses the first's
# dependencies); the binary is copied out because a cache mount is not part of the image.
RUN --mount=type=cache,id=vigil-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=vigil-cargo-git,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,id=vigil-target,target=/src/target,sharing=locked \
    cargo build --locked --release -p "${CRATE}" --bin "${CRATE}" \
 && install -D -m 0755 "target/release/${CRATE}" "/out/${CRATE}"
# The runtime image has glibc, libgcc_s and OpenSSL 3 and nothing else: fail here, not at
# container start, if the binary needs another shared library.
RUN unexpected="$(readelf -d "/out/${CRATE}" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' \
        | grep -vxE 'lib(c|m|dl|rt|pthread|gcc_s|ssl|crypto)\.so\.[0-9]+|ld-linux-[a-z0-9-]+\.so\.[0-9]+' || true)" \
 && if [ -n "${unexpected}" ]; then \
        echo "error: ${CRATE} needs ${unexpected}, which the runtime image lacks" >&2; exit 1; \
    fi

# ---- runtime: glibc, libgcc, libssl3, CA certificates, tzdata; no shell; UID 65532 --------
FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="vigil stream-processor" \
      org.opencontainers.image.description="Scores every reading on the readings topic with the model server over gRPC, in order, at least once" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/stream-processor /usr/local/bin/stream-processor
# /live, /ready, /metrics (`admin_listen`, default 0.0.0.0:9103); gRPC ReplayService and
# health (`grpc_listen`, default 0.0.0.0:50062). Configure with
# PROCESSOR_* variables (PROCESSOR_KAFKA__BOOTSTRAP_SERVERS, PROCESSOR_MODEL__ENDPOINTS),
# --config FILE.toml or flags; `stream-processor --print-config` shows the result.
EXPOSE 9103 50062
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/stream-processor"]
