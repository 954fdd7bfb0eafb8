# Sourced by scripts/test (from the repository root): what the tests report beyond pass/fail.
# The tests append to $TEST_REPORT_DIR (tests/src/report.rs): `backends`, one line per test
# and database backend it ran on, and `skipped`, one line per test that could not run.

export TEST_REPORT_DIR="$PWD/target/test-report"
rm -rf "$TEST_REPORT_DIR"
mkdir -p "$TEST_REPORT_DIR"

# tests_on BACKEND: how many distinct tests reported running on BACKEND.
tests_on() {
  local backends="$TEST_REPORT_DIR/backends"
  if [ ! -f "$backends" ]; then
    echo 0
    return
  fi
  awk -v b="$1" '$1 == b { print $2 }' "$backends" | sort -u | wc -l
}

# print_test_report: how many tests ran on each backend, and every test skipped, by name.
print_test_report() {
  local skipped="$TEST_REPORT_DIR/skipped"
  echo "== tests by database backend: SQLite $(tests_on sqlite), PostgreSQL $(tests_on postgres)" \
    "(a test that used both counts on each)"
  if [ -s "$skipped" ]; then
    echo "== SKIPPED: $(sort -u "$skipped" | wc -l) tests (or scenario rows) could not run:"
    sort -u "$skipped" | sed 's/^/   /'
  else
    echo "== skipped: 0"
  fi
}
