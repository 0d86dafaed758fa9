#!/usr/bin/env bash
# Install the local Slurm test cluster's packages (Debian: Slurm 22.05 + munge), unless present.
# Called by .ci/run before `make test` (CI runs as root on a fresh Debian machine).
set -euo pipefail
need=0
for cmd in sbatch slurmctld slurmd munged; do
    command -v "$cmd" >/dev/null 2>&1 || need=1
done
if [ "$need" = 0 ]; then
    echo "slurm: already installed ($(slurmctld -V 2>/dev/null))"
    exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "tests/slurm/install.sh: need root or sudo to apt-get install slurm" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge
echo "slurm: installed ($(slurmctld -V 2>/dev/null))"
