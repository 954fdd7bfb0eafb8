# Sourced by scripts/test and .ci/run (from the repository root, after scripts/lib/python.sh,
# whose apt_install it uses): the PostgreSQL server the PostgreSQL tests run against.
#
# ensure_postgres exports TEST_DATABASE_URL (database `test` on 127.0.0.1:5432) unless it is
# set already. It finds a server there, or starts Debian's cluster, or installs Debian's
# `postgresql` package first (as root or through sudo). A stock Debian server trusts no TCP
# login: the `postgres` role then gets the password `postgres` (set over the local socket, as
# the postgres user) and PGPASSWORD is exported with it. Returns non-zero, saying why, when no
# server can be had; the PostgreSQL tests then report themselves as skipped.

# as_user USER COMMAND...: runs COMMAND as USER (root runs it directly or through runuser;
# anyone else through sudo without a password prompt).
as_user() {
  local user=$1
  shift
  if [ "$(id -un)" = "$user" ]; then
    "$@"
  elif [ "$(id -u)" -eq 0 ]; then
    if [ "$user" = root ]; then "$@"; else runuser -u "$user" -- "$@"; fi
  else
    sudo -n -u "$user" -- "$@"
  fi
}

ensure_postgres() {
  if [ -n "${TEST_DATABASE_URL:-}" ]; then
    echo "PostgreSQL: TEST_DATABASE_URL is set, using it"
    return 0
  fi
  if ! command -v pg_isready >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null 2>&1; then
      echo "PostgreSQL: no server and no apt-get to install one" >&2
      return 1
    fi
    (apt_install postgresql) || return 1
  fi
  if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1) || true
    if [ -z "$version" ]; then
      echo "PostgreSQL: nothing listens on 127.0.0.1:5432 and no Debian cluster to start" >&2
      return 1
    fi
    echo "PostgreSQL: starting the Debian cluster $version/main"
    as_user root pg_ctlcluster --skip-systemctl-redirect "$version" main start || return 1
  fi
  local _
  for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
  if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
    echo "PostgreSQL: 127.0.0.1:5432 is not accepting connections" >&2
    return 1
  fi
  local url="postgres://postgres@127.0.0.1:5432/test"
  if ! psql -h 127.0.0.1 -U postgres -d postgres -w -Atqc "SELECT 1" >/dev/null 2>&1; then
    export PGPASSWORD="${PGPASSWORD:-postgres}"
    if ! psql -h 127.0.0.1 -U postgres -d postgres -w -Atqc "SELECT 1" >/dev/null 2>&1; then
      echo "PostgreSQL: the server wants a password; setting one for the postgres role"
      as_user postgres psql -d postgres -qc "ALTER ROLE postgres PASSWORD '$PGPASSWORD'" || return 1
    fi
    url="postgres://postgres:$PGPASSWORD@127.0.0.1:5432/test"
  fi
  psql -h 127.0.0.1 -U postgres -d postgres -w -Atqc "SELECT 1 FROM pg_database WHERE datname = 'test'" | grep -q 1 \
    || psql -h 127.0.0.1 -U postgres -d postgres -w -qc "CREATE DATABASE test" || return 1
  export TEST_DATABASE_URL="$url"
  echo "PostgreSQL: 127.0.0.1:5432, database test"
}
