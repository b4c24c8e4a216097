#!/usr/bin/env bash
# husk's fuzz targets (cargo fuzz / libFuzzer; see README.md here).
#   bash tests/fuzz/run.sh [SECONDS] [TARGET...]
# Builds every target with coverage instrumentation and debug assertions
# (overflow checks), then runs each for SECONDS (default 15: the smoke run
# the test suite makes) from the seeds in tests/fuzz/seeds/TARGET, in a
# scratch corpus. Prints, per target, the executions, coverage and
# corpus size libFuzzer reports; a crash, timeout or leak of memory fails
# the run and its input is kept (path and base64 printed).
# cargo-fuzz comes from crates.io; the stable toolchain takes the
# instrumentation flags with RUSTC_BOOTSTRAP=1.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-15}"
shift || true
all=(manifest protocol spdy unpack oci_manifest virtqueue)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "tests/fuzz/run.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --version 0.13.2 --locked --quiet
fi
export RUSTC_BOOTSTRAP=1
target_dir="${HUSK_FUZZ_TARGET_DIR:-$HOME/.cache/husk-fuzz-target}"
if ! build_log="$(cargo fuzz build --fuzz-dir . -O -a -s none --codegen-units 4 \
        --target-dir "$target_dir" 2>&1)"; then
    echo "$build_log" | grep -v '^\s*Compiling' | tail -40
    echo "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out (the fuzz targets do not build)"
    exit 1
fi
bin="$target_dir/x86_64-unknown-linux-gnu/release"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=0
passed=0
for t in "${targets[@]}"; do
    corpus="$work/$t"
    mkdir -p "$corpus" "$work/crashes-$t"
    cp seeds/"$t"/* "$corpus"/
    log="$work/$t.log"
    set +e
    "$bin/$t" "$corpus" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -max_len=16384 -print_final_stats=1 -artifact_prefix="$work/crashes-$t/" >"$log" 2>&1
    rc=$?
    set -e
    execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")"
    cov="$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)"
    ft="$(grep -o 'ft: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)"
    units="$(ls "$corpus" | wc -l)"
    if [ "$rc" -eq 0 ]; then
        echo "test fuzz::$t ... ok (${seconds} s, ${execs:-0} execs, cov ${cov:-?}, ft ${ft:-?}, corpus $units)"
        passed=$((passed + 1))
    else
        echo "test fuzz::$t ... FAILED (exit $rc)"
        grep -v '^#' "$log" | tail -40 | sed 's/^/    /'
        keep="${HUSK_FUZZ_ARTIFACTS:-/tmp/husk-fuzz-artifacts}/$t"
        mkdir -p "$keep"
        for a in "$work/crashes-$t"/*; do
            [ -e "$a" ] || continue
            cp "$a" "$keep/"
            echo "    input kept: $keep/$(basename "$a"); base64: $(base64 -w0 "$a" | head -c 4000)"
        done
        failed=$((failed + 1))
    fi
    if [ -n "${HUSK_FUZZ_KEEP_CORPUS:-}" ]; then
        mkdir -p "$HUSK_FUZZ_KEEP_CORPUS/$t" && cp "$corpus"/* "$HUSK_FUZZ_KEEP_CORPUS/$t/"
    fi
done
# In the form cargo's closing lines have, so tests/run.sh counts these.
echo "test result: $([ $failed -eq 0 ] && echo ok || echo FAILED). $passed passed; $failed failed; 0 ignored; 0 measured; 0 filtered out"
[ "$failed" -eq 0 ]
