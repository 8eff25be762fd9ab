"""`metrics.jsonl` in the run directory: one JSON object per optimizer step, written by rank 0.

Keys: step, loss (mean over ranks and microsteps), lr, grad_norm, clipped,
skipped (non-finite step not applied), tokens (cumulative, all ranks),
tokens_per_sec, elapsed_s; rows of validation steps also carry val_loss.
"""

import json
import os
from pathlib import Path


def read_metrics(path):
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a killed run: everything before it is good
    return rows


class MetricsLog:
    def __init__(self, path):
        self.path = Path(path)

    def truncate_after(self, step):
        """On resume, drop rows the previous run logged after the checkpoint it resumes
        from: those steps are about to be trained again."""
        rows = [row for row in read_metrics(self.path) if row["step"] <= step]
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text("".join(json.dumps(row) + "\n" for row in rows))
        os.replace(partial, self.path)

    def append(self, row):
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
