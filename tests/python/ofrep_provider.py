"""Evaluates release-svc's features through the stock OpenFeature Python SDK and OFREP
provider (openfeature-provider-ofrep), and prints what it saw as JSON for the Rust test
(tests/tests/ofrep.rs) to check.

Environment: OFREP_URL (release-svc's OFREP base URL), OFREP_TOKEN (optional bearer token).
"""

import json
import os
import sys

from openfeature import api
from openfeature.contrib.provider.ofrep import OFREPProvider
from openfeature.evaluation_context import EvaluationContext

from details import details


def main():
    token = os.environ.get("OFREP_TOKEN")
    headers = (lambda: {"Authorization": f"Bearer {token}"}) if token else None
    api.set_provider_and_wait(OFREPProvider(os.environ["OFREP_URL"], headers_factory=headers))
    client = api.get_client()
    user = EvaluationContext(targeting_key="u1")
    staging = EvaluationContext(targeting_key="u1", attributes={"environment": "staging"})
    out = {
        "new_cart": details(client.get_boolean_details("new-cart", False, user)),
        "new_cart_staging": details(client.get_boolean_details("new-cart", True, staging)),
        "banner_text": details(client.get_string_details("banner-text", "code-default", user)),
        "old_thing": details(client.get_boolean_details("old-thing", True, user)),
        "missing": details(client.get_boolean_details("nope", True, user)),
        "mismatch": details(client.get_integer_details("banner-text", 7, user)),
    }
    api.shutdown()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
