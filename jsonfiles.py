"""JSON that strict parsers accept: NaN and infinities (a diverged loss, a skipped
step) are written as null, never as the bare `NaN` literal Python's json emits."""

import json
import math


def finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _with_nulls(value):
    if isinstance(value, dict):
        return {key: _with_nulls(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_with_nulls(item) for item in value]
    return finite_or_none(value)


def strict_json(value, **dumps_options):
    return json.dumps(_with_nulls(value), allow_nan=False, **dumps_options)
