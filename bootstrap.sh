#!/usr/bin/env bash
# Create .venv with exactly the locked environment (uv.lock) using uv.
#
# uv.lock is resolved against PyPI only. It is installed as a hash-pinned export (not `uv sync`,
# which ignores pip's configuration and fetches every wheel from files.pythonhosted.org): this
# machine's pip configuration (local wheel mirrors, a cluster's package proxy, constraints) is
# honoured, and a mirror can serve a locked wheel only if it is byte-identical to PyPI's.
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-}"   # "dev" adds the test tools

python3 -m pip --version >/dev/null 2>&1 || { echo "bootstrap: python3 with pip is required" >&2; exit 1; }
command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet --disable-pip-version-check "uv>=0.13,<0.14"
UV="$(command -v uv || echo "$(python3 -m site --user-base)/bin/uv")"

# pyproject.toml and uv.lock must agree (checked without network when they do; uv needs a Python
# that requires-python allows, also for the check).
if ! out="$("$UV" lock --check 2>&1)"; then
  echo "$out" >&2
  case "$out" in *"needs to be updated"*)
    echo "bootstrap: pyproject.toml and uv.lock disagree: run 'uv lock' and commit uv.lock" >&2 ;; esac
  exit 1
fi

# Package sources from pip's configuration (files, environment), each only if it exists here.
pip_sources() {
  python3 -m pip config list 2>/dev/null | while IFS= read -r line; do
    local key=${line%%=*} val=${line#*=} flag v
    val=${val#\'}; val=${val%\'}
    case "${key##*.}" in
      constraint) flag=-c ;;
      find-links) flag=--find-links ;;
      extra-index-url) flag=--extra-index-url ;;
      index-url) flag=--index-url ;;
      *) continue ;;
    esac
    for v in $val; do
      case "$v" in http://* | https://*) ;; *) [ -e "${v#file://}" ] || continue ;; esac
      printf '%s\n%s\n' "$flag" "$v"
    done
  done
}
mapfile -t src < <(pip_sources)

[ -x .venv/bin/python ] || "$UV" venv --quiet .venv   # the Python that requires-python allows
req=.venv/uv-lock-export.txt
"$UV" export --quiet --frozen --no-emit-project ${extras:+--extra "$extras"} -o "$req"
# --no-deps: the export is the whole locked closure, so nothing is resolved here.
# --compile-bytecode: some machines set PYTHONDONTWRITEBYTECODE, and every CLI start would recompile.
"$UV" pip install --quiet --python .venv/bin/python --compile-bytecode --no-deps \
  --index-strategy unsafe-best-match "${src[@]}" -r "$req" -e .
echo "bootstrap: .venv ready ($(.venv/bin/python -c 'from importlib.metadata import version as v
print(", ".join(f"{p} {v(p)}" for p in ("torch", "terratorch", "snakemake")))'))"
