#!/usr/bin/env bash
# System packages for the MPI and Slurm tests: Debian's Open MPI, Slurm and munge.
# Needs root and apt-get; without them it says so and the tests skip with that reason.
set -uo pipefail
if ! command -v apt-get >/dev/null 2>&1; then
  echo "sysdeps: no apt-get here; install Open MPI, slurm-wlm and munge yourself" >&2; exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "sysdeps: not root; skipping system packages (MPI/Slurm tests will be skipped)" >&2; exit 0
fi
need=()
command -v mpirun >/dev/null 2>&1 || need+=(openmpi-bin libopenmpi-dev)
command -v slurmctld >/dev/null 2>&1 || need+=(slurm-wlm munge)
[ ${#need[@]} -eq 0 ] && { echo "sysdeps: already installed"; exit 0; }
export DEBIAN_FRONTEND=noninteractive
for attempt in 1 2 3; do
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "${need[@]}" && exit 0
  echo "sysdeps: apt-get failed (attempt $attempt), retrying" >&2; sleep 5
done
echo "sysdeps: could not install ${need[*]}; the MPI/Slurm tests will be skipped" >&2
exit 0
