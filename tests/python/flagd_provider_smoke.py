"""Evaluates release-svc's features through the stock OpenFeature Python SDK and flagd
provider (RPC resolver, protocol v2), and prints what it saw as JSON for the Rust test
(tests/tests/flagd_protocol.rs) to check.

Environment: FLAGD_HOST, FLAGD_PORT (release-svc's gRPC port).
"""

import json
import os
import sys

from openfeature import api
from openfeature.contrib.provider.flagd import FlagdProvider
from openfeature.contrib.provider.flagd.config import ResolverType
from openfeature.evaluation_context import EvaluationContext

from details import details


def main():
    provider = FlagdProvider(
        host=os.environ["FLAGD_HOST"],
        port=int(os.environ["FLAGD_PORT"]),
        resolver_type=ResolverType.RPC,
        selector="flagSetId=prod",
        deadline_ms=5000,
    )
    api.set_provider_and_wait(provider)
    # A second provider without a selector: the environment comes from the context.
    unscoped = FlagdProvider(
        host=os.environ["FLAGD_HOST"],
        port=int(os.environ["FLAGD_PORT"]),
        resolver_type=ResolverType.RPC,
        deadline_ms=5000,
    )
    api.set_provider_and_wait(unscoped, domain="unscoped")
    client = api.get_client()
    by_context = api.get_client(domain="unscoped")
    user = EvaluationContext(targeting_key="u1")
    staging = EvaluationContext(targeting_key="u1", attributes={"environment": "staging"})
    out = {
        "new_cart": details(client.get_boolean_details("new-cart", False, user)),
        "new_cart_default_env": details(by_context.get_boolean_details("new-cart", False, user)),
        "new_cart_staging": details(by_context.get_boolean_details("new-cart", True, staging)),
        "banner_text": details(client.get_string_details("banner-text", "code-default", user)),
        "old_thing": details(client.get_boolean_details("old-thing", True, user)),
        "missing": details(client.get_boolean_details("nope", True, user)),
        "mismatch": details(client.get_integer_details("banner-text", 7, user)),
    }
    api.shutdown()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
