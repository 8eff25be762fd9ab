"""One error type for bad input, and the CLI wrapper that turns it into one line.

Every script wraps its entry point in `report_user_errors`: a `UserError` (bad
config, missing or corrupt dataset, unknown checkpoint, ...) prints a single
`error: ...` line and exits with status 2, no traceback. Set DEBUG=1 in the
environment to get the traceback as well.
"""

import functools
import os
import sys
import traceback


class UserError(Exception):
    """Bad input that the user can fix: the message names the file, key and valid values."""


def debug_enabled():
    return os.environ.get("DEBUG", "") not in ("", "0")


def report_user_errors(main):
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            if debug_enabled():
                traceback.print_exc()
            # Under torchrun every rank hits the same bad input: one line is enough.
            if os.environ.get("RANK", "0") == "0":
                print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper
