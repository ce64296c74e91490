#!/usr/bin/env bash
# Builds every fuzz target once and runs each for SECONDS (default 20) from its corpus, two at
# a time, then stops. Exits non-zero if any target crashed, and prints the crashing input.
#
#   scripts/fuzz.sh [SECONDS]
#
# Installs nothing: needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz
# --locked`). The committed seeds (fuzz/corpus/<target>/) are read, never written: what the
# runs find goes to fuzz/target/corpus/<target>/, crashes to fuzz/artifacts/<target>/.
set -euo pipefail

cd "$(dirname "$0")/.."

SECS=${1:-20}
# Two cores: two targets at a time.
JOBS=2
# The build: by default unoptimised (`--dev`: debug assertions and overflow checks on) and
# without a sanitizer. The targets are safe Rust over safe dependencies, where ASan finds
# little that a panic does not, and CI's 2 cores build them so in 2.5 minutes against about
# 14 CPU-minutes for an optimised ASan build. For long runs: FUZZ_BUILD=release
# FUZZ_SANITIZER=address scripts/fuzz.sh 600.
SANITIZER=${FUZZ_SANITIZER:-none}
BUILD=${FUZZ_BUILD:-dev}
case "$BUILD" in
    dev) BUILD_FLAGS=(--dev); PROFILE_DIR=debug ;;
    release) BUILD_FLAGS=(); PROFILE_DIR=release ;;
    *) echo "FUZZ_BUILD must be dev or release, not $BUILD" >&2; exit 2 ;;
esac

TRIPLE=$(rustc +nightly -vV | sed -n 's/^host: //p')
BIN=fuzz/target/$TRIPLE/$PROFILE_DIR
STATUS=fuzz/target/fuzz-status
rm -rf "$STATUS"
mkdir -p "$STATUS"

echo "building the fuzz targets ($BUILD, sanitizer: $SANITIZER)"
# No debug info: a crash's stack trace keeps its function names, and the build is faster.
CARGO_PROFILE_DEV_DEBUG=false CARGO_PROFILE_RELEASE_DEBUG=false \
    cargo +nightly fuzz build --fuzz-dir fuzz "${BUILD_FLAGS[@]}" -s "$SANITIZER"
mapfile -t TARGETS < <(cargo +nightly fuzz list --fuzz-dir fuzz)

# Runs one target for SECS seconds; its status file says "ok" or the crashing input's path.
run_one() {
    local target=$1
    local scratch=fuzz/target/corpus/$target artifacts=fuzz/artifacts/$target
    mkdir -p "$scratch" "$artifacts" "fuzz/corpus/$target"
    local log=$STATUS/$target.log
    if "$BIN/$target" "$scratch" "fuzz/corpus/$target" \
        -max_total_time="$SECS" -timeout=10 -artifact_prefix="$artifacts/" \
        -print_final_stats=1 >"$log" 2>&1; then
        echo ok >"$STATUS/$target"
    else
        local crash
        crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
        echo "${crash:-no input saved; see $log}" >"$STATUS/$target"
    fi
    printf '%-16s %s (%s runs)\n' "$target" "$(cat "$STATUS/$target")" \
        "$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
}

echo "running ${#TARGETS[@]} targets for ${SECS}s each, $JOBS at a time"
for target in "${TARGETS[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do
        wait -n || true
    done
    run_one "$target" &
done
wait

failed=0
for target in "${TARGETS[@]}"; do
    if [ "$(cat "$STATUS/$target")" != ok ]; then
        echo "CRASH in $target: $(cat "$STATUS/$target")" >&2
        echo "  reproduce: cargo +nightly fuzz run --fuzz-dir fuzz $target $(cat "$STATUS/$target")" >&2
        failed=1
    fi
done
exit "$failed"
