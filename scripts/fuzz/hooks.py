"""Schemathesis checks of NovaCron's own rules, loaded by scripts/fuzz-api.sh.

Every error answer (4xx, 5xx) carries the one JSON error shape:
    {"error": {"code": "...", "message": "...", "field"?: "...", "reason"?: "..."}}
"""

import schemathesis


@schemathesis.check
def error_shape(ctx, response, case):
    if response.status_code < 400:
        return None
    try:
        body = response.json()
    except Exception as e:  # noqa: BLE001 - any decoding failure is the finding
        raise AssertionError(
            f"{response.status_code} answer is not JSON ({e}): {response.text[:200]!r}"
        )
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        raise AssertionError(f"{response.status_code} answer has no 'error' object: {body!r}")
    for key in ("code", "message"):
        if not isinstance(error.get(key), str) or not error[key]:
            raise AssertionError(f"{response.status_code} error without '{key}': {body!r}")
    return None
