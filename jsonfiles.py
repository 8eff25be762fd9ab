"""JSON that strict parsers accept: NaN and infinities (a diverged loss, a skipped
step) are written as null, never as the bare `NaN` literal Python's json emits."""

import json
import math
from pathlib import Path


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


def write_json_result(json_path, result):
    """An evaluation script's --json output: `result` as indented strict JSON at `json_path`
    (its directory made if missing), and a line saying where."""
    path = Path(json_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(strict_json(result, indent=2) + "\n")
    print(f"wrote {path}")
