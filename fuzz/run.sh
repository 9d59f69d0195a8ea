#!/usr/bin/env bash
# Coverage-guided fuzzing of the relay's input parsers (see fuzz/README.md).
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# SECONDS per target (default 600); TARGETs default to every target below, run one after
# the other. For each target: build, replay fuzz/regressions/<target>/*, fuzz. Prints one
# summary line per target and exits non-zero when a target found a crash, a timeout or an
# out-of-memory input (saved under fuzz/artifacts/<target>/) or a regression input fails.
#
# Environment:
#   FUZZ_SANITIZER  address (default) | none | leak ...   passed to `cargo fuzz -s`
#   FUZZ_JOBS       libFuzzer -jobs/-workers (default 1: one core; the machine has two)
#   FUZZ_BUILD_ARGS extra `cargo fuzz build/run` flags, e.g. "--codegen-units 16"
#
# Works on stable Rust: RUSTC_BOOTSTRAP=1 lets stable rustc take the -Z sanitizer flags
# that cargo-fuzz passes. The fuzz crate has its own workspace and target dir (fuzz/target),
# so it never touches the main crate's build.
set -euo pipefail

FUZZ_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$FUZZ_DIR")"
ALL_TARGETS=(soap_parser callout_parser)

SECS="${1:-600}"
if [[ $# -gt 0 ]]; then shift; fi
if ! [[ "$SECS" =~ ^[0-9]+$ ]] || [[ "$SECS" -eq 0 ]]; then
    echo "usage: fuzz/run.sh [SECONDS] [TARGET...]   (targets: ${ALL_TARGETS[*]})" >&2
    exit 2
fi
TARGETS=("$@")
if [[ ${#TARGETS[@]} -eq 0 ]]; then TARGETS=("${ALL_TARGETS[@]}"); fi

SANITIZER="${FUZZ_SANITIZER:-address}"
JOBS="${FUZZ_JOBS:-1}"
# shellcheck disable=SC2206
BUILD_ARGS=(${FUZZ_BUILD_ARGS:-})

export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz from crates.io ..." >&2
    cargo install cargo-fuzz --locked
fi

# Per-target libFuzzer settings: dictionary and largest input.
target_dict() {
    case "$1" in
        soap_parser) echo "$FUZZ_DIR/soap.dict" ;;
        callout_parser) echo "$FUZZ_DIR/json.dict" ;;
        *) echo "" ;;
    esac
}
target_max_len() {
    case "$1" in
        soap_parser) echo 65536 ;;
        *) echo 16384 ;;
    esac
}

mkdir -p "$FUZZ_DIR/logs"
cd "$ROOT"
status=0
summaries=()
for t in "${TARGETS[@]}"; do
    if [[ ! -f "$FUZZ_DIR/fuzz_targets/$t.rs" ]]; then
        echo "unknown target $t (targets: ${ALL_TARGETS[*]})" >&2
        exit 2
    fi
    corpus="$FUZZ_DIR/corpus/$t"
    artifacts="$FUZZ_DIR/artifacts/$t"
    log="$FUZZ_DIR/logs/$t.log"
    mkdir -p "$corpus" "$artifacts"
    # Seeds are committed; the corpus is the working set libFuzzer grows.
    # Seeds: the Salesforce fixtures the tests use (XML for the SOAP parser, JSON for
    # callouts), plus hand-written ones in fuzz/seeds/<target>/.
    case "$t" in
        soap_parser) cp -n "$FUZZ_DIR/../examples/salesforce/"*.xml "$FUZZ_DIR/../tests/fixtures/salesforce/"*.xml "$corpus/" 2>/dev/null || true ;;
        callout_parser) cp -n "$FUZZ_DIR/../examples/salesforce/"*.json "$FUZZ_DIR/../tests/fixtures/salesforce/"*.json "$corpus/" 2>/dev/null || true ;;
    esac
    if [[ -d "$FUZZ_DIR/seeds/$t" ]]; then
        cp -n "$FUZZ_DIR/seeds/$t/"* "$corpus/" 2>/dev/null || true
    fi

    echo "== building $t (sanitizer: $SANITIZER)" >&2
    cargo fuzz build -s "$SANITIZER" --target-dir "$FUZZ_DIR/target" "${BUILD_ARGS[@]}" "$t"

    # Past crashes and hangs (fuzz/regressions/<target>/*, whole files: -max_len does not
    # apply) are replayed one by one first; a failing one is reported, fuzzing goes on.
    reg_total=0
    reg_failed=()
    reglog="$FUZZ_DIR/logs/$t.regressions.log"
    : >"$reglog"
    if [[ -d "$FUZZ_DIR/regressions/$t" ]]; then
        while IFS= read -r -d '' f; do
            reg_total=$((reg_total + 1))
            echo "== regression $f" >>"$reglog"
            if ! (cd "$FUZZ_DIR/logs" && cargo fuzz run -s "$SANITIZER" --target-dir "$FUZZ_DIR/target" \
                --fuzz-dir "$FUZZ_DIR" "${BUILD_ARGS[@]}" "$t" "$f" -- \
                -timeout=10 -rss_limit_mb=2048 "-artifact_prefix=$FUZZ_DIR/logs/regression-") \
                >>"$reglog" 2>&1; then
                reg_failed+=("$(basename "$f")")
            fi
        done < <(find "$FUZZ_DIR/regressions/$t" -maxdepth 1 -type f ! -name '*.md' ! -name '.*' -print0 | sort -z)
    fi
    if [[ ${#reg_failed[@]} -gt 0 ]]; then
        status=1
        echo "== $t: ${#reg_failed[@]} of $reg_total regression input(s) still fail: ${reg_failed[*]} (log: ${reglog#"$ROOT"/})" >&2
    fi

    before=$(find "$artifacts" -type f | wc -l)
    args=(
        "-max_total_time=$SECS"
        "-max_len=$(target_max_len "$t")"
        -timeout=10
        -rss_limit_mb=2048
        -print_final_stats=1
        "-artifact_prefix=$artifacts/"
    )
    dict="$(target_dict "$t")"
    if [[ -n "$dict" ]]; then args+=("-dict=$dict"); fi
    if [[ "$JOBS" -gt 0 ]]; then args+=("-jobs=$JOBS" "-workers=$JOBS"); fi

    echo "== fuzzing $t for ${SECS}s (log: ${log#"$ROOT"/})" >&2
    started=$(date +%s)
    rc=0
    # -jobs makes libFuzzer write fuzz-N.log into the working directory; keep it in logs/.
    (cd "$FUZZ_DIR/logs" && cargo fuzz run -s "$SANITIZER" --target-dir "$FUZZ_DIR/target" \
        --fuzz-dir "$FUZZ_DIR" "${BUILD_ARGS[@]}" "$t" "$corpus" -- "${args[@]}") \
        >"$log" 2>&1 || rc=$?
    elapsed=$(($(date +%s) - started))

    # The last status line (`#N DONE cov: C ft: F corp: K/S ...`, or the last pulse).
    last=$(grep -aE '^#[0-9]+[[:space:]]' "$log" | tail -n 1 || true)
    execs=$(grep -aoE 'stat::number_of_executed_units: [0-9]+' "$log" | tail -n 1 | awk '{print $2}' || true)
    if [[ -z "$execs" ]]; then execs=$(sed -nE 's/^#([0-9]+).*/\1/p' <<<"$last"); fi
    cov=$(grep -oE 'cov: [0-9]+' <<<"$last" | awk '{print $2}' || true)
    ft=$(grep -oE 'ft: [0-9]+' <<<"$last" | awk '{print $2}' || true)
    corp=$(grep -oE 'corp: [0-9]+/[0-9]+[a-zA-Z]*' <<<"$last" | awk '{print $2}' || true)
    fuzzed=$(grep -aoE '^Done [0-9]+ runs in [0-9]+ second' "$log" | tail -n 1 | awk '{print $5}' || true)
    after=$(find "$artifacts" -type f | wc -l)
    new=$((after - before))
    if [[ "$new" -gt 0 || "$rc" -ne 0 ]]; then
        status=1
        found=$(grep -aoE 'Test unit written to [^ ]+' "$log" | awk '{print $5}' | xargs -r -n1 basename | paste -sd' ' - || true)
        # "panicked at FILE:LINE:COL:" is followed by the message on the next line.
        kind=$(grep -aA1 -E 'panicked at ' "$log" | head -n 2 | sed -E 's/^.*(panicked at )/\1/' | paste -sd' ' - || true)
        if [[ -z "$kind" ]]; then
            kind=$(grep -aoE 'ERROR: libFuzzer: [a-z-]+|ERROR: AddressSanitizer: [a-z-]+|deadly signal' "$log" | head -n 1 || true)
        fi
        verdict="FOUND ${new} new artifact(s) (exit $rc${kind:+, $kind}): ${found:-see $log}"
    else
        verdict="no crashes, timeouts or OOMs"
    fi
    regs="regressions ${#reg_failed[@]}/$reg_total failing${reg_failed[*]:+ (${reg_failed[*]})}"
    line="$t: fuzzed ${fuzzed:-?}s (${elapsed}s wall), ${execs:-?} execs, cov ${cov:-?}, ft ${ft:-?}, corpus ${corp:-?} -- $verdict; $regs"
    summaries+=("$line")
    echo "$line"
done

if [[ ${#summaries[@]} -gt 1 ]]; then
    echo "== summary"
    printf '%s\n' "${summaries[@]}"
fi
exit "$status"
