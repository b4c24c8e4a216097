#!/usr/bin/env bash
# The whole test suite, on a fresh Debian/Ubuntu machine: installs what the
# tests need (CNI plugins, clang + wasi-libc for the C test guests, mount and
# network tools, QEMU for the guest kernels), builds the guest kernels and
# test initramfs (images/build.sh, cached: the first run takes ~4 min more),
# then builds and runs every test. Needs root (netns, mounts, cgroups).
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(containernetworking-plugins clang lld wasi-libc libclang-rt-14-dev-wasm32
          iproute2 iputils-ping iptables e2fsprogs util-linux mount
          libssl-dev pkg-config docker-registry qemu-system-x86 busybox-static
          protobuf-compiler g++)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "tests/run.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

bash images/build.sh all

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/husk-target}"
cargo fmt --all --check
# The e2e tests drive the real husk binary: build it first.
cargo build --release --workspace
# The guest agent is PID 1 of a microVM: a static binary (glibc, crt-static).
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p husk-agent --target x86_64-unknown-linux-gnu
# The README's first command, as a newcomer runs it: the example script
# installs what it needs itself, builds (a no-op here) and runs the example
# pod in the foreground (#22).
echo "tests/run.sh: bash images/examples/run.sh"
bash images/examples/run.sh
log="$(mktemp)"
export HUSK_SKIP_LOG="$(mktemp)"
trap 'rm -f "$log" "$HUSK_SKIP_LOG"' EXIT
set +e
# Every test binary runs, also after one fails, so the closing line counts all.
cargo test --release --workspace --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
# A smoke run of each fuzz target (15 s each, from its seeds; #22).
bash tests/fuzz/run.sh 15 2>&1 | tee -a "$log"
fuzz_status=${PIPESTATUS[0]}
[ "$status" -ne 0 ] || status=$fuzz_status
set -e
# One closing line for the whole suite (cargo prints one per test binary);
# a test that found what it needs missing (no /dev/kvm) is a skip, not a pass.
skipped="$(wc -l < "$HUSK_SKIP_LOG")"
[ "$skipped" -eq 0 ] || { echo "skipped:"; sed 's/^/  /' "$HUSK_SKIP_LOG"; }
awk -v s="$skipped" '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed, %d skipped\n", p - s, f, s }' "$log"
exit "$status"
