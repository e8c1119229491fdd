#!/usr/bin/env bash
# Create .venv with the pinned dependencies (pyproject.toml) using uv.
# Works with plain PyPI; where this machine's local package mirrors exist they are used too.
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-}"   # "dev" adds the test tools

python3 -m pip --version >/dev/null 2>&1 || { echo "bootstrap: python3 with pip is required" >&2; exit 1; }
command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet --disable-pip-version-check uv
UV="$(command -v uv || echo "$(python3 -m site --user-base)/bin/uv")"

src=(--index-strategy unsafe-best-match)
[ -f /etc/xdg/pip/constraints.txt ] && src+=(-c /etc/xdg/pip/constraints.txt)
[ -d /opt/wheels ] && src+=(--find-links /opt/wheels)
for idx in /opt/pypi-more/simple /opt/pypi/simple; do
  [ -d "$idx" ] && src+=(--extra-index-url "file://$idx")
done

[ -x .venv/bin/python ] || "$UV" venv --quiet --python 3.11 .venv
spec=.; [ -n "$extras" ] && spec=".[$extras]"
# --compile-bytecode: some machines set PYTHONDONTWRITEBYTECODE, and every CLI start would recompile.
"$UV" pip install --quiet --python .venv/bin/python --compile-bytecode "${src[@]}" -e "$spec"
echo "bootstrap: .venv ready ($(.venv/bin/python -c 'import terratorch, snakemake; print("terratorch", terratorch.__version__ if hasattr(terratorch, "__version__") else "?", "snakemake", snakemake.__version__)' 2>/dev/null))"
