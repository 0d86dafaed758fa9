# shellcheck shell=bash
# Shared by slurm/*.sbatch (sourced inside the batch shell; not run directly). See docs/slurm.md.
#
# Environment it reads (all optional):
#   MIDPO_REPO      the checkout to run (default: the directory sbatch was called from, $SLURM_SUBMIT_DIR)
#   MIDPO_PYTHON    the interpreter of the project's environment (default: $MIDPO_REPO/.venv/bin/python when
#                   it exists, else python3 on PATH). Nothing is installed inside a job.
#   MIDPO_SRUN_ARGS extra srun flags for the stage's step (e.g. "--cpu-bind=none"), word-split
#   MIDPO_SP        sequence parallelism for ref.sbatch / train.sbatch: tasks per Ulysses group (default 1 = off);
#                   becomes ref.sequence_parallel / train.sequence_parallel (an override on the command line wins)
#
# Per-task values (SLURM_PROCID, SLURM_LOCALID) are never expanded here: every task reads its own in
# midpo.runtime.dist.init_distributed(). Only job-wide values (MASTER_ADDR, MASTER_PORT) are set by the batch shell.

midpo_die() {
    echo "midpo slurm: error: $*" >&2
    exit 1
}

# midpo_setup STAGE: cd to the checkout, pick the interpreter, export the rendezvous variables.
midpo_setup() {
    MIDPO_STAGE=$1
    cd "$MIDPO_REPO" || midpo_die "cannot cd to MIDPO_REPO=$MIDPO_REPO"
    if [ -z "${MIDPO_PYTHON:-}" ]; then
        if [ -x "$MIDPO_REPO/.venv/bin/python" ]; then
            MIDPO_PYTHON=$MIDPO_REPO/.venv/bin/python
        else
            MIDPO_PYTHON=$(command -v python3 || command -v python) || midpo_die "no python found; set MIDPO_PYTHON"
        fi
    fi
    if [ ! -x "$MIDPO_PYTHON" ] && ! command -v "$MIDPO_PYTHON" >/dev/null; then
        # Not an error by itself: with a container (pyxis --container-image in MIDPO_SRUN_ARGS) the
        # interpreter exists only inside the job step.
        echo "midpo $MIDPO_STAGE: warning: MIDPO_PYTHON=$MIDPO_PYTHON is not on the batch host; expecting it in the step" >&2
    fi
    export MIDPO_PYTHON
    # The checkout's code wins over any installed copy (an editable install points here anyway).
    export PYTHONPATH="$MIDPO_REPO${PYTHONPATH:+:$PYTHONPATH}"

    # A launcher's variables from the submitting shell would make every task believe it is rank 0.
    unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK ROLE_RANK
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    [ -n "$MASTER_ADDR" ] || midpo_die "cannot resolve the first host of SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
    export MASTER_ADDR
    export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
    export PYTHONUNBUFFERED=1

    # One task per GPU: a GPU count that differs from the task count is a typo on the command line.
    local gpus=${SLURM_GPUS_ON_NODE:-0} tasks=${SLURM_NTASKS_PER_NODE:-}
    if [ "$gpus" -gt 0 ] 2>/dev/null && [ -n "$tasks" ] && [ "$tasks" != "$gpus" ] && [ "$MIDPO_STAGE" != prep ]; then
        midpo_die "$gpus GPUs per node but --ntasks-per-node=$tasks: pass both (--gpus-per-node=G --ntasks-per-node=G)"
    fi

    echo "midpo $MIDPO_STAGE: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_NNODES node(s) [$SLURM_JOB_NODELIST]," \
        "$SLURM_NTASKS task(s), GPUs/node ${SLURM_GPUS_ON_NODE:-0}, master $MASTER_ADDR:$MASTER_PORT"
    echo "midpo $MIDPO_STAGE: repo $MIDPO_REPO, python $MIDPO_PYTHON, started $(date -Is)"
}

# midpo_srun CMD...: one srun step over all of the job's tasks; a failing task kills the step.
midpo_srun() {
    # shellcheck disable=SC2086  # MIDPO_SRUN_ARGS is a list of flags
    srun --kill-on-bad-exit=1 --wait=60 ${MIDPO_SRUN_ARGS:-} "$@"
}

# midpo_needs_synth RECIPE [overrides]: true when the resolved config has no data.inputs, i.e. the run
# uses the embedded tiny default that `midpo synth` builds. Reads the recipe with the project's own
# loader (no YAML scraping), inside a one-task step so that it sees what the stage will see (container).
midpo_needs_synth() {
    local code answer
    code='import sys
try:
    from midpo.config import load_config
    cfg = load_config(sys.argv[1], sys.argv[2:])
except Exception:  # a bad recipe: the stage itself reports it, with its own message
    print("unknown")
else:
    print("inputs" if cfg.data.inputs else "synth")'
    # shellcheck disable=SC2086  # MIDPO_SRUN_ARGS is a list of flags
    answer=$(srun --ntasks=1 --nodes=1 ${MIDPO_SRUN_ARGS:-} "$MIDPO_PYTHON" -c "$code" "$@") || answer=unknown
    [ "$answer" = synth ]
}

# midpo_sp_override KEY: prints KEY=$MIDPO_SP when MIDPO_SP > 1 (nothing otherwise). The group size must divide the
# job's tasks; groups are consecutive ranks, so a size dividing the tasks per node keeps every all-to-all inside a
# node (NVLink) -- across nodes it runs, slower, with a warning.
midpo_sp_override() {
    local key=$1 k=${MIDPO_SP:-1} tasks=${SLURM_NTASKS:-1} per_node=${SLURM_NTASKS_PER_NODE:-}
    per_node=${per_node%%(*}
    [[ "$k" =~ ^[1-9][0-9]*$ ]] || midpo_die "MIDPO_SP=$k: a positive integer (tasks per sequence-parallel group)"
    [ "$k" -gt 1 ] || return 0
    [ $((tasks % k)) -eq 0 ] || midpo_die "MIDPO_SP=$k does not divide the job's $tasks tasks"
    if [ -n "$per_node" ] && [ $((per_node % k)) -ne 0 ]; then
        echo "midpo ${MIDPO_STAGE:-slurm}: warning: MIDPO_SP=$k does not divide $per_node tasks per node: some" \
            "sequence-parallel groups span nodes (all-to-all over the network every layer)" >&2
    fi
    echo "$key=$k"
}

midpo_done() {
    echo "midpo $MIDPO_STAGE: finished $(date -Is)"
}
