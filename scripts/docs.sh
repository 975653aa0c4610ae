#!/usr/bin/env bash
# Build or serve the documentation site (mkdocs.yml, docs/): `bash scripts/docs.sh build` writes site/ with
# warnings as errors (CI), `bash scripts/docs.sh serve` serves it on http://127.0.0.1:8000 and rebuilds on save.
# Uses .venv (scripts/setup.sh) and installs the [docs] extra (mkdocs, mkdocs-material) into it if missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case "${1:-}" in
    build|serve) ;;
    *) echo "usage: bash scripts/docs.sh build|serve [mkdocs options]" >&2; exit 2 ;;
esac
if [ ! -x .venv/bin/python ]; then
    . scripts/setup.sh  # creates .venv with specdec (the hook reads its schema and registry files)
fi
# MkDocs 1.6 and Material print a banner about their successors on every build; it is no warning about these docs
export NO_MKDOCS_2_WARNING=1
if ! .venv/bin/python -c "import mkdocs, material" 2>/dev/null; then
    echo "docs: installing the [docs] extra (mkdocs, mkdocs-material)" >&2
    # the editable-install notice setuptools prints for this layout is silenced as in setup.sh (which says why)
    PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install --quiet -e ".[docs]"
fi
command=$1
shift
if [ "$command" = build ]; then
    exec .venv/bin/mkdocs build --strict "$@"
fi
exec .venv/bin/mkdocs serve --dev-addr 127.0.0.1:8000 "$@"
