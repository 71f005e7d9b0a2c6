"""Schemathesis hooks for tests/test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

Generated bodies keep every field as drawn except token budgets: a valid `max_length` of 8,000
is a legitimate, slow request (a whole context of SmolLM2 at ~100 tok/s), and the run has a few
minutes. Large budgets have their own test (test_robustness.py); here they are capped so the
budget goes to many different requests instead of a few long ones.
"""

from __future__ import annotations

import schemathesis

BUDGETS = ("max_length", "max_tokens", "max_new_tokens", "max_completion_tokens", "n", "best_of")
CAP = 4


@schemathesis.hook
def before_call(context, case, kwargs) -> None:
    body = case.body
    if isinstance(body, dict):
        for key in BUDGETS:
            value = body.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and value > CAP:
                body[key] = CAP
