#!/usr/bin/env bash
# Builds husk and the example guest, then runs the example pod in the
# foreground. Needs root (netns, mounts) on Debian/Ubuntu.
set -euo pipefail
cd "$(dirname "$0")"
# protobuf-compiler: huskd's CRI protos are compiled at build time.
packages=(containernetworking-plugins clang lld wasi-libc libclang-rt-14-dev-wasm32 libssl-dev pkg-config
          protobuf-compiler iproute2 iptables)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/husk-target}"
cargo build -q --release --workspace
mkdir -p build
guests="$(dirname "$(ls -t "$CARGO_TARGET_DIR"/release/build/husk-tests-*/out/guests/netprobe.component.wasm | head -1)")"
cp "$guests"/probe.wasm "$guests"/probe.component.wasm "$guests"/netprobe.component.wasm build/
exec "$CARGO_TARGET_DIR/release/husk" run --rm -f shared-pod.yaml
