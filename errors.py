"""Errors that end a run with one line instead of a traceback, and the CLI wrapper
that prints them.

Every script wraps its entry point in `report_user_errors`:

- a `UserError` (bad config, missing or corrupt dataset, unknown checkpoint, a full
  disk, ...) prints a single `error: ...` line (from rank 0: every rank hits the same
  bad input; a `RankLocalUserError` from the rank that found it) and exits with status 2.
  Under torchrun the other ranks say nothing, and on rank 0's node wait for the launcher
  to stop them (as it does once any rank fails), so rank 0's failure is the first it
  observes;
- a `RankLost` (a peer process died mid-run) prints its line on every surviving
  rank and exits with status 1.

Under torchrun the line also goes into the worker's error file, so torchrun's own
failure summary ("Root Cause") shows it. Set DEBUG=1 in the environment to get
the traceback as well.
"""

import functools
import json
import os
import signal
import sys
import time
import traceback

# How long a rank that leaves the report to rank 0 waits for torchrun's SIGTERM: torchrun
# checks its workers every 0.1 s, so this is only reached when rank 0 did not fail.
QUIET_RANK_WAIT_S = 30


class UserError(Exception):
    """Bad input that the user can fix: the message names the file, key and valid values."""


class RankLocalUserError(UserError):
    """Bad input that only the rank raising it sees (a token in its own microbatch): it
    prints the line itself, since rank 0 may never hear of it."""


class RankLost(Exception):
    """Another rank of the job died: this one cannot go on, and says from where a restart resumes."""


def one_line(text):
    """A library's error message as one line: `error: ...` output is a single line."""
    return " ".join(str(text).split())


def debug_enabled():
    return os.environ.get("DEBUG", "") not in ("", "0")


def debug_details(error):
    """An exception's own text, for the end of an error line: only with DEBUG=1, since it
    speaks of the library's internals, not of what the user did."""
    return f" ({type(error).__name__}: {' '.join(str(error).split())})" if debug_enabled() else ""


def write_torchrun_error_file(line):
    """torchrun's agent reads TORCHELASTIC_ERROR_FILE from a failed worker and prints it in
    its failure summary; this is the format of torch's own ErrorHandler, with our line in
    place of the traceback."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    message = {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}
    try:
        with open(path, "w") as f:
            json.dump({"message": message}, f)
    except OSError:
        pass  # the summary then says <N/A>; the line itself is already on stderr


def _report(error, print_it, exit_code):
    if debug_enabled():
        traceback.print_exc()
    line = f"error: {error}"
    if print_it:
        print(line, file=sys.stderr, flush=True)
    write_torchrun_error_file(line)
    sys.exit(exit_code)


def wait_for_launcher_to_stop_us():
    """A rank other than 0, on rank 0's node, with an error every rank found: exiting now
    could make it the first failure torchrun sees, whose Root Cause would then be this
    rank's and not the line rank 0 printed. So it waits, silently, for the launcher's
    SIGTERM (the default action: the training loop's handler would absorb it). On the
    other nodes no SIGTERM follows rank 0's failure: their ranks exit at once, quietly."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    time.sleep(QUIET_RANK_WAIT_S)


def report_user_errors(main):
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            is_main = os.environ.get("RANK", "0") == "0"
            speaks = is_main or isinstance(e, RankLocalUserError)
            if not speaks and os.environ.get("GROUP_RANK", "0") == "0":  # on rank 0's node
                wait_for_launcher_to_stop_us()
                speaks = True  # it did not come: rank 0 may not have said it
            _report(e, print_it=speaks, exit_code=2)
        except RankLost as e:
            _report(e, print_it=True, exit_code=1)

    return wrapper
