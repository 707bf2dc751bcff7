#!/bin/bash
# A/B a kernel change on one GPU: the same benchmark, run in several source trees in turn on one machine.
#
#   scripts/ab_trees.sh export .ab main my-branch
#       (here) one source tree per git ref under .ab/<ref>, with its commit in .ab/<ref>.commit;
#       keep .ab out of git (.git/info/exclude) and carry it to the GPU machine.
#   ROUNDS=2 scripts/ab_trees.sh run .ab "$OUT/ab" -- python3 scripts/bench_scan.py --quick --no-peers
#       (there) runs the command in each tree, in the order exported (baseline first), ROUNDS times over
#       (A B A B: drift of the machine shows as a difference between rounds), each run with
#       - that tree's kernels: mambatrain_kernels is imported through a link to <tree>/kernels, whatever an
#         editable install points at, and mambatrain from the tree;
#       - MAMBATRAIN_COMMIT set to the tree's commit (the benchmarks write it into their JSON);
#       - `--out OUT/<ref>_r<round>` appended, the log in OUT/<ref>_r<round>.log, a line per run in OUT/progress.
#
# Why trees rather than `git checkout` between runs: the GPU machine gets a copy of the working tree whose
# .git may not hold the refs, and one call can then A/B everything without touching the tree under test.
set -u

usage() { sed -n '2,16p' "$0" >&2; exit 2; }

export_trees() {
    local dir=$1; shift
    mkdir -p "$dir"
    for ref in "$@"; do
        local name=${ref//\//_}
        rm -rf "${dir:?}/$name"
        mkdir -p "$dir/$name"
        git archive "$ref" | tar -x -C "$dir/$name" || exit 1
        git rev-parse "$ref" > "$dir/$name.commit"
        echo "$name" >> "$dir/ORDER"
        echo "$dir/$name <- $ref $(cat "$dir/$name.commit")"
    done
}

run_trees() {
    local dir out
    dir=$(realpath "$1"); out=$2; shift 2
    [ "${1:-}" = "--" ] && shift
    [ $# -gt 0 ] || usage
    mkdir -p "$out"; out=$(realpath "$out")
    for round in $(seq 1 "${ROUNDS:-1}"); do
        while read -r name; do
            local tree=$dir/$name shim=$dir/.shim_$name tag=${name}_r$round
            mkdir -p "$shim"; ln -sfn "$tree/kernels" "$shim/mambatrain_kernels"
            echo "$(date +%T) start $tag" >> "$out/progress"
            (cd "$tree" && PYTHONPATH="$shim:$tree${PYTHONPATH:+:$PYTHONPATH}" \
                MAMBATRAIN_COMMIT=$(cat "$dir/$name.commit") "$@" --out "$out/$tag") > "$out/$tag.log" 2>&1
            echo "$(date +%T) end $tag rc=$?" >> "$out/progress"
        done < "$dir/ORDER"
    done
}

case "${1:-}" in
    export) [ $# -ge 3 ] || usage; shift; rm -f "$1/ORDER"; export_trees "$@" ;;
    run) [ $# -ge 4 ] || usage; shift; run_trees "$@" ;;
    *) usage ;;
esac
