"""What an OpenFeature evaluation returned, as plain JSON for the Rust tests to check."""


def details(d):
    reason = d.reason.value if hasattr(d.reason, "value") else d.reason
    error = d.error_code.value if hasattr(d.error_code, "value") else d.error_code
    return {"value": d.value, "reason": reason, "variant": d.variant, "error": error}
