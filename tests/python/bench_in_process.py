"""In-process against remote evaluation in the same client: the stock OpenFeature Python SDK
with two flagd providers on one release-svc, the RPC resolver (one gRPC call per
evaluation) and the in-process resolver (flag definitions synced, evaluated locally). Both
resolve the same flag for the same users, alternating rounds; prints one JSON line per round
and a summary. Used by `bench-release in-process` (docs/benchmarks.md).

Environment: FLAGD_HOST, FLAGD_PORT, FLAG_KEY, ROUNDS (default 5), EVALUATIONS (per round
and resolver, default 5000).
"""

import json
import os
import statistics
import time

from openfeature import api
from openfeature.contrib.provider.flagd import FlagdProvider
from openfeature.contrib.provider.flagd.config import ResolverType
from openfeature.evaluation_context import EvaluationContext


def provider(kind):
    return FlagdProvider(
        host=os.environ["FLAGD_HOST"],
        port=int(os.environ["FLAGD_PORT"]),
        resolver_type=kind,
        selector="flagSetId=prod",
        deadline_ms=10000,
    )


def run(client, key, n, offset):
    started = time.perf_counter()
    on = 0
    for i in range(n):
        ctx = EvaluationContext(targeting_key=f"user-{offset + i}")
        on += client.get_boolean_value(key, False, ctx)
    return n / (time.perf_counter() - started), on


def main():
    key = os.environ["FLAG_KEY"]
    rounds = int(os.environ.get("ROUNDS", "5"))
    n = int(os.environ.get("EVALUATIONS", "5000"))
    api.set_provider_and_wait(provider(ResolverType.RPC), "remote")
    api.set_provider_and_wait(provider(ResolverType.IN_PROCESS), "in-process")
    remote, local = api.get_client("remote"), api.get_client("in-process")
    run(remote, key, 200, 0)
    run(local, key, 200, 0)
    ratios = []
    for r in range(rounds):
        order = [("remote", remote), ("in-process", local)]
        if r % 2:
            order.reverse()
        rates, seen = {}, {}
        for name, client in order:
            rates[name], seen[name] = run(client, key, n, r * n)
        # The same users: both resolvers must have made the same decisions.
        assert seen["remote"] == seen["in-process"], seen
        ratio = rates["in-process"] / rates["remote"]
        ratios.append(ratio)
        print(json.dumps({"round": r + 1, "remote_per_s": round(rates["remote"]),
                          "in_process_per_s": round(rates["in-process"]),
                          "ratio": round(ratio, 2), "on": seen["remote"]}), flush=True)
    print(json.dumps({"median_ratio": round(statistics.median(ratios), 2)}), flush=True)
    api.shutdown()


if __name__ == "__main__":
    main()
