#!/usr/bin/env bash
# husk's guest kernels and test initramfs, built reproducibly from Debian's
# packages into a cache that a machine fills once.
#
#   images/build.sh [all | kernel-a | kernel-b | init | kubectl]
#
# Output (default ~/.cache/husk-images, or $HUSK_IMAGES_DIR), each name a
# symlink into a directory keyed by what it was built from:
#   kernel-a.bzImage     Debian's linux-image-cloud-amd64
#   kernel-a.modules/    its virtio/vsock/fs modules and modules.load (load order)
#   kernel-b.bzImage     the minimal microVM kernel from linux-source + kernel/microvm.config
#   kernel-b.vmlinux     the same kernel as an ELF with a PVH entry (direct boot)
#   test-init            the tiny static test init (init/test-init.c)
#   initramfs-a.cpio.gz  test-init as /init + kernel A's modules
#   initramfs-b.cpio.gz  test-init as /init
#   kubectl              Debian's kubernetes-client (1.20): a real SPDY client
#                        for huskd's streaming tests, unpacked, not installed
# Needs root only to apt-get install missing build tools.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${HUSK_IMAGES_DIR:-$HOME/.cache/husk-images}"
mkdir -p "$out"
# Temp dirs of this run (downloads, staging) go, also when a step fails.
trap 'rm -rf "$out"/tmp.*' EXIT

# Kernel A's modules that a microVM guest needs (their dependencies follow).
KERNEL_A_MODULES=(virtio_mmio virtio_blk virtio_net virtio-rng virtio_console
                  vmw_vsock_virtio_transport virtiofs overlay erofs)

log() { echo "images/build.sh: $*" >&2; }

need_packages() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
}

# The binary package a Debian meta package (linux-image-cloud-amd64,
# linux-source) currently points at, and its version.
resolve() {
    local pkg
    pkg="$(apt-cache depends "$1" 2>/dev/null | awk '/Depends:/ { print $2; exit }')"
    [ -n "$pkg" ] || { log "apt does not know $1; run apt-get update"; exit 1; }
    echo "$pkg $(apt-cache policy "$pkg" | awk '/Candidate:/ { print $2 }')"
}

# Downloads one .deb into a fresh temp dir and prints its path.
download() {
    local dir
    dir="$(mktemp -d "$out/tmp.XXXXXX")"
    (cd "$dir" && apt-get download -qq "$1=$2" 2>/dev/null)
    ls "$dir"/*.deb
}

link() { ln -sfn "$1" "$out/$2.tmp" && mv -T "$out/$2.tmp" "$out/$2"; }

# Removes the builds of one kind that the current one replaced (an older
# package version, config or source); the cache keeps one of each.
prune() {
    local kind="$1" keep="$2" d
    for d in "$out/$kind"-*/; do
        d="${d%/}"
        [ "$(basename "$d")" = "$keep" ] || rm -rf "$d"
    done
}

build_init() {
    need_packages gcc cpio
    local key dir
    key="$(sha256sum "$here/init/test-init.c" | cut -c1-16)"
    dir="$out/init-$key"
    if [ ! -x "$dir/test-init" ]; then
        mkdir -p "$dir"
        gcc -Os -static -nostdlib -ffreestanding -fno-stack-protector \
            -fno-asynchronous-unwind-tables -fno-pie -no-pie -Wall -Werror \
            -Wl,--build-id=none -s -o "$dir/test-init.tmp" "$here/init/test-init.c"
        mv "$dir/test-init.tmp" "$dir/test-init"
    fi
    link "init-$key/test-init" test-init
    prune init "init-$key"
}

# cpio newc archive of a staging dir, gzip'd, with fixed owners and times.
pack_initramfs() {
    local stage="$1" dest="$2"
    find "$stage" -exec touch -h -d @0 {} +
    (cd "$stage" && find . -mindepth 1 | LC_ALL=C sort |
        cpio --quiet -o -H newc -R 0:0 --reproducible) | gzip -9 -n > "$dest.tmp"
    mv "$dest.tmp" "$dest"
}

build_kernel_a() {
    need_packages kmod cpio gzip
    local pkg ver dir deb root kver m
    read -r pkg ver < <(resolve linux-image-cloud-amd64)
    dir="$out/kernel-a-$pkg-$ver"
    if [ ! -f "$dir/done" ]; then
        log "kernel A: $pkg $ver"
        rm -rf "$dir" && mkdir -p "$dir/modules"
        deb="$(download "$pkg" "$ver")"
        root="$dir/root"
        dpkg-deb -x "$deb" "$root"
        rm -rf "$(dirname "$deb")"
        kver="$(ls "$root/lib/modules")"
        cp "$root/boot/vmlinuz-$kver" "$dir/bzImage"
        cp "$root/boot/config-$kver" "$dir/config"
        depmod -b "$root" "$kver"
        # modules.dep lists a module's dependencies deepest last: load them
        # in reverse, each once, then the module itself.
        local -A seen=()
        local order=() line deps d i
        for m in "${KERNEL_A_MODULES[@]}"; do
            line="$(grep -E "/$m\.ko:" "$root/lib/modules/$kver/modules.dep")" ||
                { log "kernel A $kver has no module $m"; exit 1; }
            read -ra deps <<< "${line#*:}"
            for ((i = ${#deps[@]} - 1; i >= 0; i--)); do
                d="${deps[i]}"
                [ -n "${seen[$d]:-}" ] || { seen[$d]=1; order+=("$d"); }
            done
            d="${line%%:*}"
            [ -n "${seen[$d]:-}" ] || { seen[$d]=1; order+=("$d"); }
        done
        : > "$dir/modules/modules.load"
        for d in "${order[@]}"; do
            cp "$root/lib/modules/$kver/$d" "$dir/modules/"
            basename "$d" .ko >> "$dir/modules/modules.load"
        done
        rm -rf "$root"
        touch "$dir/done"
    fi
    link "kernel-a-$pkg-$ver/bzImage" kernel-a.bzImage
    link "kernel-a-$pkg-$ver/modules" kernel-a.modules
    prune kernel-a "kernel-a-$pkg-$ver"
}

build_kernel_b() {
    need_packages build-essential bc flex bison libelf-dev xz-utils patch cpio kmod
    local pkg ver key dir src jobs
    read -r pkg ver < <(resolve linux-source)
    key="$( (echo "$pkg $ver"; cat "$here/kernel/microvm.config" "$here"/kernel/patches/*.patch) |
        sha256sum | cut -c1-16)"
    dir="$out/kernel-b-$key"
    if [ ! -f "$dir/done" ]; then
        log "kernel B: $pkg $ver, config and patches $key (a few minutes, once per machine)"
        rm -rf "$dir" && mkdir -p "$dir"
        local deb
        deb="$(download "$pkg" "$ver")"
        dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$dir" --wildcards './usr/src/*.tar.xz'
        rm -rf "$(dirname "$deb")"
        tar -xJf "$dir"/usr/src/*.tar.xz -C "$dir"
        rm -rf "$dir/usr"
        src="$(ls -d "$dir"/linux-source-*)"
        for p in "$here"/kernel/patches/*.patch; do
            patch -s -p1 -d "$src" < "$p"
        done
        # (merge_config.sh warns about every option it overrides: expected)
        make -s -C "$src" tinyconfig >/dev/null
        "$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$here/kernel/microvm.config" >/dev/null 2>&1
        make -s -C "$src" olddefconfig >/dev/null 2>&1
        # Every option asked for must have stuck (a missing dependency drops it silently).
        local k v got bad=0
        while IFS='=' read -r k v; do
            case "$k" in CONFIG_*) ;; *) continue ;; esac
            got="$(grep -E "^$k=" "$src/.config" | cut -d= -f2 || true)"
            if [ "$v" = n ]; then [ -z "$got" ] && continue; elif [ "$got" = "$v" ]; then continue; fi
            log "kernel/microvm.config: $k=$v did not stick (got '${got:-unset}'); fix its dependencies"
            bad=1
        done < "$here/kernel/microvm.config"
        [ $bad -eq 0 ] || exit 1
        jobs="$(nproc)"
        make -s -C "$src" -j"$jobs" bzImage >/dev/null
        cp "$src/arch/x86/boot/bzImage" "$dir/bzImage"
        cp "$src/vmlinux" "$dir/vmlinux"
        cp "$src/.config" "$dir/config"
        rm -rf "$src"
        touch "$dir/done"
    fi
    link "kernel-b-$key/bzImage" kernel-b.bzImage
    link "kernel-b-$key/vmlinux" kernel-b.vmlinux
    link "kernel-b-$key/config" kernel-b.config
    prune kernel-b "kernel-b-$key"
}

build_kubectl() {
    local ver dir deb
    ver="$(apt-cache policy kubernetes-client 2>/dev/null | awk '/Candidate:/ { print $2 }')"
    [ -n "$ver" ] && [ "$ver" != "(none)" ] ||
        { log "apt does not know kubernetes-client; run apt-get update"; exit 1; }
    dir="$out/kubectl-${ver//[:+~]/_}"
    if [ ! -x "$dir/kubectl" ]; then
        log "kubectl: kubernetes-client $ver"
        rm -rf "$dir" && mkdir -p "$dir"
        deb="$(download kubernetes-client "$ver")"
        dpkg-deb --fsys-tarfile "$deb" | tar -x -O ./usr/bin/kubectl > "$dir/kubectl.tmp"
        rm -rf "$(dirname "$deb")"
        chmod +x "$dir/kubectl.tmp"
        mv "$dir/kubectl.tmp" "$dir/kubectl"
    fi
    link "$(basename "$dir")/kubectl" kubectl
    prune kubectl "$(basename "$dir")"
}

build_initramfs() {
    local which="$1" stage
    stage="$(mktemp -d "$out/tmp.XXXXXX")"
    cp "$out/test-init" "$stage/init"
    if [ "$which" = a ]; then
        mkdir -p "$stage/lib/modules"
        cp "$out/kernel-a.modules/"* "$stage/lib/modules/"
    fi
    pack_initramfs "$stage" "$out/initramfs-$which.cpio.gz"
    rm -rf "$stage"
}

target="${1:-all}"
case "$target" in
    init) build_init ;;
    kubectl) build_kubectl ;;
    kernel-a) build_kernel_a ;;
    kernel-b) build_kernel_b ;;
    all)
        build_init
        build_kernel_a
        build_kernel_b
        build_initramfs a
        build_initramfs b
        build_kubectl
        ;;
    *) echo "usage: images/build.sh [all|kernel-a|kernel-b|init|kubectl]" >&2; exit 2 ;;
esac
