"""The release-svc under test, in conformance mode, and the control shim the testbed's
change and restart scenarios need.

Conformance mode is a plain release-svc started with flagd-compatible options:
  --flagd-default-environment conformance     the testbed's flags live in one environment
  --flagd-environment-attribute ''            the environment is fixed, so STATIC is honest
  --flagd-context injectedmetadata=set        the testbed's static context
  --change-calendar none                      no deploy-svc here: no freeze windows
  --flagd-source-alias flags/allFlags.json=conformance
  --flagd-source-alias rawflags/selector-flags.json=selector-set
  --fractional-bucketing v1|v2|v3             one server per profile (rows pick theirs)
and the testbed's flag files imported with ImportFlagd (skip_invalid: flags release-svc
refuses at write time are listed, not imported).

Environment: RELEASE_SVC_BIN (the binary), FLAGD_TESTBED (the testbed directory).
"""

import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

TESTBED = Path(os.environ.get("FLAGD_TESTBED", Path(__file__).parents[1] / "flagd-testbed"))

# The testbed serves the files of flags/ as one merged set (flags/allFlags.json, whose
# $evaluators every flag may reference) and the selector files as their own sets.
SELECTOR_FILES = {"selector-flags.json": "selector-set", "selector-flag-combined-metadata.json": None}


def documents():
    """(environment, document) pairs to import: the selector set first, so that the flag both
    define (cross-flagset-flag) ends as the merged set's definition."""
    merged = {"flags": {}, "$evaluators": {}}
    out = []
    for path in sorted((TESTBED / "flags").glob("*.json")):
        doc = json.loads(path.read_text())
        if path.name in SELECTOR_FILES:
            if SELECTOR_FILES[path.name]:
                out.append((SELECTOR_FILES[path.name], doc))
            continue
        merged["flags"].update(doc.get("flags", {}))
        merged["$evaluators"].update(doc.get("$evaluators", {}))
    out.append(("conformance", merged))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def grpcurl(port: int, method: str, body: dict) -> dict:
    out = subprocess.run(
        ["grpcurl", "-plaintext", "-d", "@", f"127.0.0.1:{port}", f"release.v1.ReleaseService/{method}"],
        input=json.dumps(body),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"grpcurl {method} failed: {out.stderr}")
    return json.loads(out.stdout or "{}")


class ReleaseSvc:
    """One release-svc process; `lose_connection` stops it and starts it again on the same
    port and database (the testbed's restart control)."""

    def __init__(self, binary: str, workdir: Path, bucketing: str):
        self.binary = binary
        self.bucketing = bucketing
        self.workdir = workdir
        self.port = free_port()
        self.proc = None
        self.lock = threading.Lock()
        self.skipped = {}
        self.changing_variant = "foo"

    def args(self):
        return [
            self.binary,
            "--listen", f"127.0.0.1:{self.port}",
            "--database", str(self.workdir / "release.db"),
            # No deploy-svc: the testbed flags carry no deployment gate.
            "--deploy-svc", "http://127.0.0.1:9",
            "--change-calendar", "none",
            "--flagd-default-environment", "conformance",
            "--flagd-environment-attribute", "",
            "--flagd-context", "injectedmetadata=set",
            "--flagd-source-alias", "flags/allFlags.json=conformance",
            "--flagd-source-alias", "rawflags/selector-flags.json=selector-set",
            "--flagd-keep-alive-seconds", "1",
            "--fractional-bucketing", self.bucketing,
            "--drain-timeout-ms", "100",
        ]

    def start(self):
        log = open(self.workdir / "release-svc.log", "ab")
        self.proc = subprocess.Popen(self.args(), stdout=log, stderr=log)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"release-svc exited: {(self.workdir / 'release-svc.log').read_text()}")
                time.sleep(0.05)
        raise RuntimeError("release-svc did not listen within 30 s")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def lose_connection(self, seconds: float):
        """Kills the server now and starts it again after `seconds`, in the background."""

        def run():
            with self.lock:
                self.stop()
                time.sleep(seconds)
                self.start()

        threading.Thread(target=run, daemon=True).start()
        time.sleep(0.1)

    def wait_up(self):
        with self.lock:
            pass

    def import_testbed(self):
        for environment, doc in documents():
            out = grpcurl(
                self.port,
                "ImportFlagd",
                {"environment": environment, "document": json.dumps(doc), "skip_invalid": True},
            )
            for s in out.get("skipped", []):
                self.skipped[s["key"]] = s.get("problems", [])

    def modify_changing_flag(self):
        """The testbed's change control: flips changing-flag's default variant."""
        self.changing_variant = "bar" if self.changing_variant == "foo" else "foo"
        doc = json.loads((TESTBED / "flags" / "changing-flag.json").read_text())
        doc["flags"]["changing-flag"]["defaultVariant"] = self.changing_variant
        grpcurl(self.port, "ImportFlagd", {"environment": "conformance", "document": json.dumps(doc)})


@pytest.fixture(scope="session")
def servers():
    """One release-svc per fractional bucketing profile, started when first needed."""
    binary = os.environ.get("RELEASE_SVC_BIN")
    if not binary:
        pytest.fail("RELEASE_SVC_BIN must name the release-svc binary")
    started = {}
    with tempfile.TemporaryDirectory() as tmp:

        def get(bucketing):
            if bucketing not in started:
                workdir = Path(tmp) / bucketing
                workdir.mkdir()
                svc = ReleaseSvc(binary, workdir, bucketing)
                svc.start()
                svc.import_testbed()
                print(f"flags release-svc refused at import: {sorted(svc.skipped)}")
                started[bucketing] = svc
            return started[bucketing]

        yield get
        for svc in started.values():
            svc.stop()


@pytest.fixture
def release_svc(request, servers):
    """The server for this row's bucketing profile: @fractional-v1 and @fractional-v3 rows
    get their own; every other row runs against the default (v2, flagd 0.15-0.16)."""
    tags = {m.name for m in request.node.iter_markers()}
    if "fractional-v1" in tags:
        return servers("v1")
    if "fractional-v3" in tags:
        return servers("v3")
    return servers("v2")


# Tags whose rows need what this run does not have: TLS certificates, unix sockets, target
# URIs, an HTTP proxy answering 403, or a provider mode other than RPC; deprecated rows
# (superseded by @no-default-variant). Every fractional bucketing profile runs, each against
# a server started with it.
EXCLUDED_TAGS = {
    "customCert",
    "unixsocket",
    "targetURI",
    "forbidden",
    "deprecated",
    "metadata-provider",
    "syncpayload",
}


_WRITE_TIME = (
    "release-svc refuses invalid targeting when a flag is written (ImportFlagd with "
    "skip_invalid lists the flag as skipped), so the flag is FLAG_NOT_FOUND instead of a "
    "PARSE_ERROR at every evaluation"
)
_PROVIDER_DEFAULTS = (
    "openfeature-provider-flagd 0.6.1's own defaults differ from the testbed's "
    "(retryBackoffMaxMs 5000, retryGracePeriod 2): the provider's configuration, no server involved"
)

# Rows that fail for a known, deliberate reason. They run as strict xfails: if one starts
# passing, the run fails until it is taken off this list.
KNOWN_DIFFERENCES = {
    "test_default_config[retryBackoffMaxMs-Integer-12000]": _PROVIDER_DEFAULTS,
    "test_default_config[retryGracePeriod-Integer-5]": _PROVIDER_DEFAULTS,
    "test_flag_disabled_in_one_flag_set_enabled_in_another[rawflags/selector-flags.json-true-STATIC]": (
        "a feature's DISABLED state is global in release-svc; hiding a feature in one "
        "environment is a release decision (not released there)"
    ),
    "test_ref_to_nonexistent_evaluator_yields_parse_error": _WRITE_TIME,
    "test_errors_and_edge_cases[error-targeting-flag-3-PARSE_ERROR]": _WRITE_TIME,
    "test_errors_and_edge_cases[missing-variant-targeting-flag-3-GENERAL]": (
        "a rule naming a variant the flag lacks serves the default variant in release-svc "
        "instead of failing the evaluation"
    ),
}


# feature file -> outcome -> rows
_outcomes = {}


def pytest_collection_modifyitems(config, items):
    selected, deselected = [], []
    for item in items:
        tags = {m.name for m in item.iter_markers()}
        excluded = tags & EXCLUDED_TAGS
        counts = _outcomes.setdefault(feature_of(item), {})
        if "rpc" not in tags:
            counts["not rpc"] = counts.get("not rpc", 0) + 1
        elif excluded:
            counts["excluded"] = counts.get("excluded", 0) + 1
        if "rpc" in tags and not excluded:
            reason = KNOWN_DIFFERENCES.get(item.name)
            if reason:
                item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
            selected.append(item)
        else:
            deselected.append(item)
    config.hook.pytest_deselected(items=deselected)
    items[:] = selected


def feature_of(item) -> str:
    from pytest_bdd.scenario import scenario_wrapper_template_registry

    scenario = scenario_wrapper_template_registry.get(getattr(item, "obj", None))
    return Path(scenario.feature.filename).name if scenario else "?"


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        outcome = "xfailed" if hasattr(report, "wasxfail") else report.outcome
        feature = report.user_properties[0][1] if report.user_properties else "?"
        counts = _outcomes.setdefault(feature, {})
        counts[outcome] = counts.get(outcome, 0) + 1


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.user_properties.append(("feature", feature_of(item)))


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(
        "rows per feature file (passed / known difference / failed / @rpc rows excluded by tag / not @rpc):"
    )
    for feature in sorted(_outcomes):
        c = _outcomes[feature]
        terminalreporter.write_line(
            f"  {feature}: {c.get('passed', 0)} / {c.get('xfailed', 0)} / "
            f"{c.get('failed', 0)} / {c.get('excluded', 0)} / {c.get('not rpc', 0)}"
        )
    path = os.environ.get("CONFORMANCE_REPORT")
    if path:
        Path(path).write_text(json.dumps(_outcomes, indent=2, sort_keys=True))
