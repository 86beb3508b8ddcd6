#!/usr/bin/env bash
# Fuzzing idem's parsers: keys, sf-strings, canonical JSON fingerprints, idem.toml.
#
#   bash fuzz/run.sh --short   (CI) replay every committed corpus file, and every saved
#                              crash under fuzz/artifacts/, through the targets' checks
#                              on stable: the `fuzz_corpora_replay` test in
#                              crates/idem-proxy/tests/hostile.rs, which includes
#                              fuzz/src/lib.rs. No cargo-fuzz, no extra build.
#   bash fuzz/run.sh --fuzz    a few seconds of real fuzzing per target
#                              (FUZZ_SECONDS, default 20).
#   bash fuzz/run.sh --long    a fixed number of executions per target
#                              (FUZZ_RUNS, default 2000000).
#   bash fuzz/run.sh --fuzz|--long TARGET...   only those targets.
#
# --fuzz and --long need cargo-fuzz (installed here when missing: about 5 minutes on
# two cores) and run it on the stable toolchain with RUSTC_BOOTSTRAP=1, since
# `cargo fuzz` passes nightly-only flags (-Zsanitizer, ...). They build without a
# sanitizer (`-s none`): idem forbids unsafe code, so AddressSanitizer would slow every
# run for nothing; debug assertions are on (`-a`), so overflows still panic. One target
# at a time, one job: the machine is shared. New interesting inputs are merged into
# fuzz/corpus/<target>/; before committing any, minimise them
# (`RUSTC_BOOTSTRAP=1 cargo fuzz cmin --features libfuzzer -s none -a TARGET`) and keep
# the corpus small (config_parse and json_fingerprint grow by thousands of files in a
# minute; their committed corpora are hand-written seeds plus past findings). Crashes
# land in fuzz/artifacts/<target>/ (not committed) and are replayed by --short until
# fixed; copy a fixed one into the corpus so it stays a regression input.
#
# Why --short does not fuzz: installing cargo-fuzz took 5 minutes here and building the
# instrumented targets 28 (on two busy cores), far beyond the two minutes CI can give.
# Why the replay lives in a workspace test rather than in this package: built here, the
# fuzz package compiles its dependencies again with other features (2.5 minutes); the
# workspace test binary is already built by CI's test step.
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS=(key_parse sf_string json_fingerprint config_parse)
mode="${1:---short}"
shift || true
if [ "$#" -gt 0 ]; then
    TARGETS=("$@")
fi

case "$mode" in
--short)
    # --workspace: the features CI's `cargo nextest run --workspace` built with, so
    # nothing is compiled again.
    exec cargo test --workspace --test hostile -- --exact fuzz_corpora_replay --nocapture
    ;;
--fuzz)
    limit=(-max_total_time="${FUZZ_SECONDS:-20}")
    ;;
--long)
    limit=(-runs="${FUZZ_RUNS:-2000000}")
    ;;
*)
    echo "usage: $0 [--short|--fuzz|--long] [TARGET...]" >&2
    exit 2
    ;;
esac

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
export RUSTC_BOOTSTRAP=1
flags=(--features libfuzzer -s none -a --target-dir fuzz/target)
cargo fuzz build "${flags[@]}"
status=0
for t in "${TARGETS[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    log="fuzz/target/$t.log"
    echo "== $t"
    # Only the corpus dir is given: libFuzzer adds new coverage to it as it goes.
    if ! cargo fuzz run "${flags[@]}" "$t" "fuzz/corpus/$t" -- \
        "${limit[@]}" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1; then
        status=1
        grep -E -A20 'panicked|ERROR|SUMMARY' "$log" | head -60 >&2 || true
        echo "$t: FAILED, crash input in fuzz/artifacts/$t, full log in $log" >&2
    fi
    grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|stat::new_units_added|#[0-9]+ +DONE)' "$log" || true
    echo "corpus: $(ls "fuzz/corpus/$t" | wc -l) files, $(du -sh "fuzz/corpus/$t" | cut -f1)"
done
exit "$status"
