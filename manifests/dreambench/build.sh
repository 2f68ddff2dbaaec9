#!/usr/bin/env bash
# Build the DreamBench manifest: manifests/dreambench/build.sh [SRC] [OUT]
# SRC defaults to ../shared/dreambench, OUT to runs/manifests/dreambench (both from the repository root).
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC="${1:-../shared/dreambench}"
OUT="${2:-runs/manifests/dreambench}"
exec .venv/bin/dreamfleet manifest build --dreambench "$SRC" \
    --config manifests/dreambench/recipe.yaml --out "$OUT" --overwrite
