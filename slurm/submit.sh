#!/usr/bin/env bash
# Submit the whole pipeline as three chained Slurm jobs: prep -> ref -> train.
#
#   slurm/submit.sh RECIPE [key.sub=value ...]
#   slurm/submit.sh --rounds N RECIPE [key.sub=value ...]   # `midpo iterate`: N rounds, 4 jobs each
#
# With --rounds N, each round k is four slurm/round.sbatch jobs, rollout -> ref -> train -> finish
# (round k+1's rollout waits for round k's finish), printed as `r<k>-<step> JOBID`. Round 1's first job
# builds the start models in one task (synth, SFT; with iterate.start=export the whole base run): for a
# large base, submit the base chain first and pass its last job id in MIDPO_AFTER.
#
# Each stage starts only when the previous one succeeded (--dependency=afterok); when one fails, the
# ones after it are cancelled (--kill-on-invalid-dep=yes) instead of pending forever. Prints one line
# per submitted stage, `STAGE JOBID`. Logs: $MIDPO_REPO/logs/<job-name>-<jobid>.out.
#
# Environment (all optional, flags are word-split and go before the script on the sbatch line, so
# they override the #SBATCH defaults in slurm/*.sbatch):
#   MIDPO_SBATCH_ARGS   flags for every stage, e.g. "--partition=gpu --account=proj --qos=normal"
#   MIDPO_PREP_ARGS     flags for stage 1 only, e.g. "--cpus-per-task=32"
#   MIDPO_REF_ARGS      flags for stage 2 only, e.g. "--nodes=2"
#   MIDPO_TRAIN_ARGS    flags for stage 3 only, e.g. "--nodes=4 --time=2-00:00:00"
#   MIDPO_ROUND_ARGS    flags for every round job (--rounds), e.g. "--nodes=2"
#   MIDPO_STAGES        which stages to submit, in order (default "prep ref train"), e.g. "ref train"
#   MIDPO_AFTER         a job id the first submitted stage waits for (afterok)
#   MIDPO_PYTHON, MIDPO_REPO: see slurm/lib.sh (exported to the jobs)
set -euo pipefail

MIDPO_REPO=${MIDPO_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
export MIDPO_REPO
if [ $# -lt 1 ] || [ "$1" = -h ] || [ "$1" = --help ]; then
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
    [ $# -ge 1 ] && exit 0 || exit 2
fi
ROUNDS=0
if [ "$1" = --rounds ]; then
    [ $# -ge 3 ] && [[ "$2" =~ ^[1-9][0-9]*$ ]] || { echo "submit.sh: usage: submit.sh --rounds N RECIPE [key.sub=value ...]" >&2; exit 2; }
    ROUNDS=$2
    shift 2
fi
RECIPE=$1
shift
# Resolve a recipe path against the caller's directory: the jobs run in the repo root.
if [ -e "$RECIPE" ]; then
    RECIPE=$(cd "$(dirname "$RECIPE")" && pwd)/$(basename "$RECIPE")
fi
command -v sbatch >/dev/null || { echo "submit.sh: sbatch not found (is this a Slurm login node?)" >&2; exit 1; }
mkdir -p "$MIDPO_REPO/logs"

prev=${MIDPO_AFTER:-}
# submit_job NAME SCRIPT ARGS...: one job after the previous one (afterok); prints `NAME JOBID`
submit_job() {
    local name=$1 script=$2 extra=$3
    shift 3
    local dep=()
    if [ -n "$prev" ]; then
        dep=(--dependency="afterok:$prev" --kill-on-invalid-dep=yes)
    fi
    local out
    # shellcheck disable=SC2086  # the *_ARGS variables are lists of flags
    out=$(sbatch --parsable --chdir="$MIDPO_REPO" --export=ALL "${dep[@]}" ${MIDPO_SBATCH_ARGS:-} $extra "$script" "$@")
    prev=${out%%;*}  # --parsable prints "jobid[;cluster]"
    echo "$name $prev"
}
if [ "$ROUNDS" -gt 0 ]; then
    for k in $(seq 1 "$ROUNDS"); do
        for step in rollout ref train finish; do
            submit_job "r$k-$step" "$MIDPO_REPO/slurm/round.sbatch" "--job-name=midpo-r$k-$step ${MIDPO_ROUND_ARGS:-}" \
                "$RECIPE" "$k" "$step" "$@"
        done
    done
    exit 0
fi
for stage in ${MIDPO_STAGES:-prep ref train}; do
    case "$stage" in
        prep) extra=${MIDPO_PREP_ARGS:-} ;;
        ref) extra=${MIDPO_REF_ARGS:-} ;;
        train) extra=${MIDPO_TRAIN_ARGS:-} ;;
        *) echo "submit.sh: unknown stage '$stage' in MIDPO_STAGES (prep, ref, train)" >&2; exit 2 ;;
    esac
    dep=()
    if [ -n "$prev" ]; then
        dep=(--dependency="afterok:$prev" --kill-on-invalid-dep=yes)
    fi
    # shellcheck disable=SC2086  # the *_ARGS variables are lists of flags
    out=$(sbatch --parsable --chdir="$MIDPO_REPO" --export=ALL "${dep[@]}" \
        ${MIDPO_SBATCH_ARGS:-} $extra "$MIDPO_REPO/slurm/$stage.sbatch" "$RECIPE" "$@")
    prev=${out%%;*}  # --parsable prints "jobid[;cluster]"
    echo "$stage $prev"
done
