"""What rank 0 prints while it trains; the other ranks print nothing.

On a terminal: a progress bar (steps, loss, tokens/s, MFU). When the output goes to a
file or a pipe (SLURM, nohup, `| tee`), no bar, whose carriage-return updates would pile
up in the log, but a plain line every log_interval steps: step, loss, learning rate,
tokens/s and ETA. Either way one line for each validation (with the best so far), each
HellaSwag and CORE score, each checkpoint saved (its path) and each skipped step, written with
tqdm.write so that they never break the bar. `quiet` keeps only the final summary
(errors go to standard error regardless).
"""

import datetime
import sys

from tqdm import tqdm


def output_is_terminal():
    """Whether both of rank 0's output streams are terminals (the bar writes to standard error)."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def duration_text(seconds):
    return str(datetime.timedelta(seconds=round(seconds)))


def loss_text(loss):
    return "nan" if loss is None else f"{loss:.4f}"


def progress_line(row, total_steps):
    """A metrics.jsonl row as one plain log line."""
    return (f"step {row['step']}/{total_steps - 1} | loss {loss_text(row['loss'])} | lr {row['lr']:.3e} | "
            f"{row['tokens_per_sec']:,.0f} tokens/s | ETA {duration_text(row['eta_s'])}")


def unused_gpus_warning(device_type, visible_gpus, local_processes):
    """A warning when this node has more GPUs than torchrun started processes, else None."""
    if device_type != "cuda" or visible_gpus <= local_processes:
        return None
    return (f"warning: {visible_gpus} GPUs are visible but {local_processes} process(es) were started on this "
            f"node, so {visible_gpus - local_processes} GPU(s) stay idle; launch with "
            f"`torchrun --nproc_per_node={visible_gpus}` to use them all")


class Console:
    def __init__(self, shown, total_steps, start_step, log_interval, quiet=False, terminal=None):
        """`shown`: whether this rank prints (rank 0). `terminal`: whether the output is a
        terminal (default: ask the streams)."""
        self.shown = shown and not quiet
        self.total_steps, self.log_interval = total_steps, log_interval
        self.terminal = output_is_terminal() if terminal is None else terminal
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not (self.shown and self.terminal),
                        unit="step", dynamic_ncols=True)

    def line(self, text):
        if self.shown:
            tqdm.write(text)

    def rows(self, rows):
        """Steps recorded (metrics.jsonl rows): the bar moves, or every log_interval steps a line."""
        for row in rows:
            if self.terminal:
                self.bar.update(1)
            elif (row["step"] + 1) % self.log_interval == 0 or row["step"] == self.total_steps - 1:
                self.line(progress_line(row, self.total_steps))
        row = rows[-1]
        if self.terminal and self.shown:
            mfu = "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}"
            self.bar.set_postfix(loss=loss_text(row["loss"]), tok_per_s=f"{row['tokens_per_sec']:,.0f}",
                                 per_dev=f"{row['tokens_per_sec_per_device']:,.0f}", mfu=mfu)

    def validation(self, step, val_loss, best_val_loss):
        self.line(f"step {step}: validation loss {loss_text(val_loss)} (best so far {loss_text(best_val_loss)})")

    def hellaswag(self, step, scores):
        self.line(f"step {step}: HellaSwag acc {scores['hellaswag_acc']:.4f}, "
                  f"acc_norm {scores['hellaswag_acc_norm']:.4f}")

    def core(self, step, scores):
        self.line(f"step {step}: CORE {scores['core']:.4f} (standard error {scores['core_se']:.4f})")

    def skipped(self, step, in_a_row, limit):
        self.line(f"step {step}: skipped (non-finite loss or gradient), {in_a_row} in a row; the run stops at "
                  f"{limit} (max_skipped_steps)")

    def saved(self, step, checkpoint_dir, is_best):
        self.line(f"step {step}: saved checkpoint {checkpoint_dir}" + (" (best so far)" if is_best else ""))

    def close(self):
        self.bar.close()
