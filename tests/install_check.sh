#!/usr/bin/env bash
# Install check (issue #15): midpo works from a NON-editable install, run from a directory that is not the
# checkout. An editable install (what `make test` uses) finds recipes/ and ds_configs/ in the source tree whatever
# pyproject.toml ships; only a built wheel shows whether they are package data, and only a working directory
# outside the checkout shows that nothing is found through the current directory or the repository root.
#
#   bash tests/install_check.sh          # from .ci/run, after `make test`; ~3-5 min on 2 cores
#
# Steps: copy the working tree (tracked + untracked, not ignored) to a temp folder, so the build leaves no build/
# or *.egg-info in the checkout and cannot pick up stale ones; a fresh venv; torch first (as the Makefile: the CPU
# wheel where one lies on disk, TORCH_PIP_ARGS as in make), then `pip install SRC` (a wheel, not -e); then, from
# another temp folder: `midpo config show tiny` (read back to an equal config), `midpo config list`, and
# `midpo run --config tiny` shrunk to a few steps of every stage, checking exit codes and outputs.
# KEEP=1 keeps the temp folder (printed) for a look afterwards.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCH_PIP_ARGS="${TORCH_PIP_ARGS:-}"
RUN_TIMEOUT="${RUN_TIMEOUT:-900}"  # seconds for the shrunk `midpo run`: a hang fails the check instead of CI

WORK="$(mktemp -d "${TMPDIR:-/tmp}/midpo-install-check.XXXXXX")"
cleanup() {
    local rc=$?
    if [[ "${KEEP:-0}" == 1 || $rc -ne 0 ]]; then
        echo "install check: left in $WORK (exit code $rc)" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

fail() { echo "install check: FAILED: $*" >&2; exit 1; }
step() { echo "--- install check: $* (${SECONDS}s)"; }

# No PYTHONPATH or virtualenv of the caller may leak in: the installed package must be the one that runs.
unset PYTHONPATH VIRTUAL_ENV PYTHONHOME
export PIP_DISABLE_PIP_VERSION_CHECK=1

step "copying the working tree to $WORK/src"
mkdir -p "$WORK/src" "$WORK/cwd"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | tar -c --null -T - -f -) | tar -x -C "$WORK/src" \
    || fail "could not copy the working tree"

step "fresh venv, torch==$TORCH_VERSION"
"$PYTHON" -m venv "$WORK/venv"
VBIN="$WORK/venv/bin"
# shellcheck disable=SC2086  # TORCH_PIP_ARGS is a list of flags, split on purpose (as in the Makefile)
"$VBIN/python" -m pip install "torch==$TORCH_VERSION" $TORCH_PIP_ARGS > "$WORK/pip-torch.log" 2>&1 \
    || { rc=$?; tail -30 "$WORK/pip-torch.log" >&2; fail "pip install torch (exit code $rc)"; }

step "pip install (not editable) $WORK/src"
"$VBIN/python" -m pip install "$WORK/src" > "$WORK/pip-midpo.log" 2>&1 \
    || { rc=$?; tail -30 "$WORK/pip-midpo.log" >&2; fail "pip install of the project (exit code $rc)"; }
rm -rf "$WORK/src"  # from here on nothing can be found through a source tree: the installed package is all there is

cd "$WORK/cwd"
MIDPO="$VBIN/midpo"
where="$("$VBIN/python" -c 'import midpo; print(midpo.__file__)')"
[[ "$where" == "$WORK/venv/"* ]] || fail "midpo imported from $where, not from the fresh venv"
"$VBIN/python" -m pip show -f midpo > "$WORK/installed-files.txt"
for data in midpo/recipes/tiny.yaml midpo/ds_configs/zero3_cpu_fp32.json; do
    grep -q "^ *$data\$" "$WORK/installed-files.txt" || fail "$data is not among the installed files (package data)"
done

step "midpo config show tiny"
"$MIDPO" config show tiny train.lr=2e-5 > shown.yaml || fail "midpo config show tiny (exit code $?)"
grep -q "^# == train: " shown.yaml || fail "midpo config show: no section headers"
"$VBIN/python" - <<'EOF' || fail "midpo config show's YAML does not read back to the same config"
from midpo.config import load_config

assert load_config("shown.yaml") == load_config("tiny", ["train.lr=2e-5"])
EOF

step "midpo config list"
"$MIDPO" config list > list.txt || fail "midpo config list (exit code $?)"
grep -q "^  tiny " list.txt && grep -q "^  zero3_cpu_fp32 " list.txt || fail "midpo config list: $(cat list.txt)"
grep -q "$WORK/venv/" list.txt || fail "midpo config list does not read the installed package's folders"

step "midpo run --config tiny, shrunk"
# Every stage runs (synth, prep, sft, sample + prep, ref and train on 2 processes under torchrun, export, eval),
# each on a few rows/steps. chosen=sample_or_gold: a 30-step SFT model rarely answers right, and without a right
# sample a prompt would make no pair at all.
run_dir="$WORK/cwd/run"
timeout "$RUN_TIMEOUT" "$MIDPO" run --config tiny --nproc 2 --eval-prompts 8 run_dir="$run_dir" \
    synth.n_pairs=200 synth.n_eval_prompts=8 synth.n_onpolicy_prompts=48 \
    sft.steps=30 sft.batch_size=16 onpolicy.samples=2 onpolicy.chosen=sample_or_gold \
    train.max_steps=3 train.micro_batch_size=4 > run.log 2>&1 \
    || { rc=$?; tail -40 run.log >&2; fail "midpo run (exit code $rc; log: $WORK/cwd/run.log)"; }
for out in summary.json config.yaml export/config.json export/model.safetensors checkpoints/latest \
        ref/manifest.json data/manifest.json sft/config.json onpolicy/pairs.jsonl; do
    [[ -s "$run_dir/$out" ]] || { tail -40 run.log >&2; fail "midpo run left no $run_dir/$out"; }
done
"$VBIN/python" - "$run_dir/summary.json" <<'EOF' || fail "summary.json lacks the eval of both models"
import json
import sys

summary = json.load(open(sys.argv[1]))
assert summary["reference"]["n"] == summary["policy"]["n"] == 8, summary
EOF
ls "$WORK/cwd" | grep -qv -e '^run$' -e '\.yaml$' -e '\.txt$' -e '\.log$' \
    && fail "midpo wrote outside its run folder: $(ls "$WORK/cwd")"

step "passed"
