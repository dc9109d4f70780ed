#!/usr/bin/env bash
# Snakemake runs this once, inside the freshly created envs/hsat.yaml environment, from the
# workflow's working directory (the repository root): install hsat from that checkout.
# Set HSAT_SOURCE to install from another checkout.
set -euo pipefail
src="${HSAT_SOURCE:-$PWD}"
if [ ! -f "$src/pyproject.toml" ] || [ ! -d "$src/src/hsat" ]; then
    echo "hsat.post-deploy.sh: $src is not an hsat checkout (no pyproject.toml / src/hsat);" \
         "run snakemake from the repository root or set HSAT_SOURCE" >&2
    exit 1
fi
# Dependencies come from envs/hsat.yaml; --no-deps keeps pip from resolving torch again.
python -m pip install --no-deps -e "$src"
