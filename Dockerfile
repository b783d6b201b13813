# syntax=docker/dockerfile:1
#
# conntrack tracer image. Build from the repository root:
#
#   docker build -t conntrack-tracer:dev .
#
# Builder: Debian 12 only, the same toolchain `cargo xtask setup` installs
# (xtask/src/setup.rs: TOOLCHAIN_PACKAGES, LLVM_PACKAGES, BPF_LINKER_VERSION). Debian's
# rustc-web/cargo-web (1.96, bookworm-security) build both the eBPF crate (it ships a prebuilt
# `core` for bpfel-unknown-none in libstd-rust-web-dev-bpf) and the userspace crate
# (rust-version 1.87), so no rustup toolchain is downloaded. tracer/tests/deploy_manifests.rs
# checks that the package lists and the bpf-linker version here match setup.rs.

FROM debian:bookworm AS builder

ENV DEBIAN_FRONTEND=noninteractive \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/bin:/usr/bin:/bin

# Round 1 (setup.rs TOOLCHAIN_PACKAGES). ca-certificates: cargo fetches crates over https.
RUN apt-get update \
 && apt-get install -y --no-install-recommends rustc-web cargo-web libstd-rust-web-dev-bpf ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Round 2 (setup.rs LLVM_PACKAGES): the LLVM major that Debian's rustc was built with, so
# bpf-linker emits bitcode rustc's LLVM reads (`LLVM version: 22.1.8` -> 22).
RUN LLVM_MAJOR="$(/usr/bin/rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')" \
 && test -n "$LLVM_MAJOR" \
 && echo "$LLVM_MAJOR" > /llvm-major \
 && apt-get update \
 && apt-get install -y --no-install-recommends llvm-${LLVM_MAJOR}-dev libpolly-${LLVM_MAJOR}-dev libzstd-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*

# bpf-linker, exactly as setup.rs installs it (version, features, LLVM_PREFIX).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    LLVM_MAJOR="$(cat /llvm-major)" \
 && LLVM_PREFIX="/usr/lib/llvm-${LLVM_MAJOR}" cargo install bpf-linker@0.13.0 \
      --locked --no-default-features --features "llvm-${LLVM_MAJOR}" --root /usr/local \
 && bpf-linker --version

# tracer/build.rs runs aya-build, which runs `rustup run /usr cargo build ...` for the eBPF
# crate and build.rs insists on a `rustup` on PATH. Debian 12 has no rustup package; this
# stand-in implements only `rustup run TOOLCHAIN CMD...` with TOOLCHAIN a prefix (/usr).
RUN printf '%s\n' \
      '#!/bin/sh' \
      'set -e' \
      '[ "$1" = run ] || { echo "rustup stand-in: only \"rustup run TOOLCHAIN CMD...\"" >&2; exit 1; }' \
      'tc=$2; shift 2' \
      '[ -x "$tc/bin/rustc" ] || { echo "rustup stand-in: $tc/bin/rustc not found" >&2; exit 1; }' \
      'PATH="$tc/bin:$PATH" exec "$@"' \
      > /usr/local/bin/rustup \
 && chmod 0755 /usr/local/bin/rustup

WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    /usr/bin/cargo build --release --locked -p tracer \
 && install -D -m 0755 target/release/tracer /out/tracer

# Runtime: only what the binary execs. `watch` and `probes` exec nothing (tracefs is
# mounted by the manifests; preflight's `mount -t tracefs` fallback uses util-linux's
# `mount`, already in the base image). `doctor` runs iptables-save/ip6tables-save
# (iptables), `nft -j list ruleset` (nftables) and `ip -j -d addr show` (iproute2).
# `lab` (dnsmasq, conntrack, musl-gcc, ...) is a development tool and is not supported here.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables nftables iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/tracer /usr/local/bin/tracer
ENTRYPOINT ["/usr/local/bin/tracer"]
CMD ["watch", "--json"]
