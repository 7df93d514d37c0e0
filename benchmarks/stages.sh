# Sourced by gpu_check.sh and gpu_check_more.sh: run stages under time limits on a GPU machine
# whose whole call is short and whose returned folder is small (at most 8 files, 16 MiB each).
#
# After `stages_begin "$@"` (arguments: [--dry-run] DIR), `stage N NAME LIMIT command...` runs one
# stage:
#   - under `timeout -s INT -k 10 LIMIT`: SIGINT lets Python (and pytest) stop cleanly and keep
#     their results, and whatever ignores it is killed 10 s later;
#   - its output goes to logs/N-NAME.log; its figures are the last "FIGURES ..." line it printed,
#     else its last line;
#   - "RESULT N ok|FAIL NAME: figures (seconds)" is appended to DIR/summary.txt and printed;
#   - logs.tgz in DIR is rebuilt, so a call cut short still brings back every finished log.
# `stages_end` prints the summary and returns 0 when every stage passed.  Python runs with
# PYTHONUNBUFFERED=1 and FASTNST_DEBUG=1 (tracebacks, not one-line errors), from this tree.
# A dry run (the same stages on the CPU, Triton interpreted) checks the scripts, not the speed: its
# limits are 20 times the GPU's, so a slow or loaded machine passes and only a hang is stopped.

stages_begin() {
    dry_run=0
    if [ "${1:-}" = "--dry-run" ]; then
        dry_run=1
        shift
    fi
    if [ $# -ne 1 ] || [ -z "$1" ]; then
        echo "usage: bash $0 [--dry-run] DIR" >&2
        exit 2
    fi
    for tool in timeout tar; do
        command -v "$tool" > /dev/null || { echo "$0: '$tool' is missing (coreutils, tar)" >&2; exit 2; }
    done
    mkdir -p "$1" || exit 2
    out=$(cd "$1" && pwd)
    cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
    work=$(mktemp -d)
    mkdir -p "$work/logs"
    summary="$out/summary.txt"
    : > "$summary"
    failures=0
    PY=${PYTHON:-python3}
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 FASTNST_DEBUG=1
    limit_scale=1
    if [ "$dry_run" = 1 ]; then
        export TRITON_INTERPRET=1
        dry_flag=--dry-run
        limit_scale=20
    else
        unset TRITON_INTERPRET
        dry_flag=
    fi
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap stages_finish EXIT
    echo "fastnst $(basename "$0")$([ "$dry_run" = 1 ] && echo ' (dry run)'): $(date -u +%Y-%m-%dT%H:%M:%SZ)," \
         "commit ${FASTNST_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}, results in $out" \
        | tee -a "$work/logs/header.txt"
}

stages_archive() {
    tar -czf "$work/logs.tgz" -C "$work" logs 2>/dev/null && mv -f "$work/logs.tgz" "$out/logs.tgz"
}

stage() {
    local number=$1 name=$2 limit=$(( $3 * limit_scale ))
    shift 3
    local log="$work/logs/$number-$name.log" started rc took figures verdict
    echo "== stage $number $name (limit ${limit}s)"
    started=$(date +%s)
    timeout -s INT -k 10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    took=$(( $(date +%s) - started ))
    figures=$(grep -a '^FIGURES ' "$log" | tail -n 1 | cut -c 9-)
    [ -n "$figures" ] || figures=$(grep -av '^[[:space:]]*$' "$log" | tail -n 1)
    verdict=ok
    if [ "$rc" -ne 0 ]; then
        verdict=FAIL
        failures=$((failures + 1))
        case $rc in
            124|137) figures="time limit ${limit}s reached; $figures" ;;
            *) figures="exit $rc; $figures" ;;
        esac
        tail -n 15 "$log" | sed 's/^/    | /'
    fi
    echo "RESULT $number $verdict $name: $figures (${took}s)" | tee -a "$summary"
    stages_archive
}

stages_finish() {
    stages_archive
    rm -rf "$work"
    echo "== summary ($out)"
    cat "$summary"
}

stages_end() {
    [ "$failures" -eq 0 ]
}
