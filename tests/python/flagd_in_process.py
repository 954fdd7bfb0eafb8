"""Evaluates cases through the stock OpenFeature Python SDK and flagd provider with its
in-process resolver (flag definitions from flagd's sync protocol, evaluated locally), for
the Rust test tests/tests/flagd_sync.rs.

Environment: FLAGD_HOST, FLAGD_PORT, FLAGD_SELECTOR, CASES (a JSON file: a list of
{"flag", "type": "boolean"|"string", "default", "targetingKey" (or null), "attributes"}).

Prints one JSON line: {"results": [{"value", "variant", "reason", "error"}, ...],
"seconds": in-process evaluation time}. Then, for each line read on stdin
({"flag", "type", "default", "want"}), resolves the flag (without context) every 2 ms until
it answers `want`: prints {"polling": flag} when it starts (the flag must still answer
otherwise), then {"flag", "ms"}: the time from starting to seeing the answer (the Rust test
changes the flag when it reads the first line).
"""

import json
import logging
import os
import sys
import time

from openfeature import api
from openfeature.contrib.provider.flagd import FlagdProvider
from openfeature.contrib.provider.flagd.config import ResolverType
from openfeature.evaluation_context import EvaluationContext


def resolve(client, case):
    ctx = EvaluationContext(
        targeting_key=case.get("targetingKey"), attributes=case.get("attributes") or {}
    )
    if case["type"] == "boolean":
        return client.get_boolean_details(case["flag"], case["default"], ctx)
    return client.get_string_details(case["flag"], case["default"], ctx)


def name(x):
    return None if x is None else (x.value if hasattr(x, "value") else str(x))


def main():
    # flagd's fractional logs every context without a targeting key; the test has many.
    logging.getLogger("openfeature.contrib").setLevel(logging.CRITICAL)
    provider = FlagdProvider(
        host=os.environ["FLAGD_HOST"],
        port=int(os.environ["FLAGD_PORT"]),
        resolver_type=ResolverType.IN_PROCESS,
        selector=os.environ["FLAGD_SELECTOR"],
        deadline_ms=10000,
    )
    api.set_provider_and_wait(provider)
    client = api.get_client()
    with open(os.environ["CASES"]) as f:
        cases = json.load(f)
    started = time.perf_counter()
    results = []
    for case in cases:
        d = resolve(client, case)
        results.append(
            {
                "value": d.value,
                "variant": d.variant,
                "reason": name(d.reason),
                "error": name(d.error_code),
            }
        )
    seconds = time.perf_counter() - started
    print(json.dumps({"results": results, "seconds": seconds}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        wait = json.loads(line)
        if resolve(client, {**wait, "targetingKey": None}).value == wait["want"]:
            print(json.dumps({"flag": wait["flag"], "error": "already changed"}), flush=True)
            sys.exit(1)
        print(json.dumps({"polling": wait["flag"]}), flush=True)
        started = time.perf_counter()
        deadline = started + 30
        while time.perf_counter() < deadline:
            if resolve(client, {**wait, "targetingKey": None}).value == wait["want"]:
                break
            time.sleep(0.002)
        else:
            print(json.dumps({"flag": wait["flag"], "error": "not seen within 30 s"}), flush=True)
            sys.exit(1)
        ms = (time.perf_counter() - started) * 1000
        print(json.dumps({"flag": wait["flag"], "ms": ms}), flush=True)
    api.shutdown()


if __name__ == "__main__":
    main()
