"""Resolves one boolean flag for 1,000 users through the stock OpenFeature Python SDK and
flagd provider (RPC resolver, protocol v2), waits for a configuration_change event naming
the flag, and resolves again. Prints one JSON line per pass for the Rust test
(tests/tests/flagd_protocol.rs), which flips the kill switch between the two.

Environment: FLAGD_HOST, FLAGD_PORT, FLAG_KEY.
"""

import json
import os
import sys
import threading

from openfeature import api
from openfeature.contrib.provider.flagd import FlagdProvider
from openfeature.contrib.provider.flagd.config import ResolverType
from openfeature.evaluation_context import EvaluationContext
from openfeature.event import ProviderEvent

USERS = [f"user-{i}" for i in range(1000)]


def resolve_all(client, key):
    values, reasons = [], {}
    for user in USERS:
        d = client.get_boolean_details(key, False, EvaluationContext(targeting_key=user))
        values.append(d.value)
        reason = d.reason.value if hasattr(d.reason, "value") else d.reason
        reasons[reason] = reasons.get(reason, 0) + 1
    return {"true": sum(values), "false": len(values) - sum(values), "reasons": reasons}


def main():
    key = os.environ["FLAG_KEY"]
    provider = FlagdProvider(
        host=os.environ["FLAGD_HOST"],
        port=int(os.environ["FLAGD_PORT"]),
        resolver_type=ResolverType.RPC,
        selector="flagSetId=prod",
        deadline_ms=5000,
    )
    api.set_provider_and_wait(provider)
    client = api.get_client()
    changed = threading.Event()
    payload = {}

    def on_change(details):
        if key in (details.flags_changed or []):
            payload["flags_changed"] = sorted(details.flags_changed)
            changed.set()

    client.add_handler(ProviderEvent.PROVIDER_CONFIGURATION_CHANGED, on_change)
    first = resolve_all(client, key)
    changed.clear()
    print(json.dumps(first), flush=True)
    if not changed.wait(15):
        print(json.dumps({"error": "no configuration_change event within 15 s"}), flush=True)
        sys.exit(1)
    second = resolve_all(client, key)
    second["flags_changed"] = payload["flags_changed"]
    print(json.dumps(second), flush=True)
    api.shutdown()


if __name__ == "__main__":
    main()
