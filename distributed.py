"""Process-group set-up and the one pattern for work done by some ranks while the rest wait.

Under torchrun the environment gives RANK, LOCAL_RANK and WORLD_SIZE; run as a
plain `python ddp_train.py ...` it is a world of one. Global rank chooses data
and rank-0 work; local rank chooses the device and per-node work.
"""

import datetime
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from errors import UserError


# Every rank has already joined the rendezvous by then: a first all-reduce that takes
# longer than this is stuck, not slow.
CONNECTIVITY_TIMEOUT = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    local_world_size: int = 1  # ranks on this node

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def is_local_main(self):
        return self.local_rank == 0


def init_distributed(timeout_minutes):
    """CUDA + NCCL when CUDA is available, otherwise CPU + gloo."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend, extra = "nccl", {"device_id": device}
    else:
        device = torch.device("cpu")
        backend, extra = "gloo", {}
    if "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, timeout=timeout, **extra)
    else:
        # A plain single process: a process group of one, so that the training
        # code makes the same collective calls whatever the world size.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout, **extra)
    return DistContext(rank, local_rank, world_size, device, local_world_size)


def check_connectivity(ctx, timeout=CONNECTIVITY_TIMEOUT):
    """A small all-reduce at start-up, so a broken interconnect fails fast with advice
    instead of hanging until the (long) process-group timeout."""
    probe = torch.ones(1, device=ctx.device)
    try:
        dist.all_reduce(probe, async_op=True).wait(timeout=timeout)
    except Exception as e:
        raise RuntimeError(
            f"rank {ctx.rank}: the ranks cannot communicate ({type(e).__name__}: {e}). "
            "On multi-GPU machines without working peer-to-peer or InfiniBand, try "
            "NCCL_P2P_DISABLE=1 and/or NCCL_IB_DISABLE=1; NCCL_DEBUG=INFO shows more."
        ) from e
    if int(probe.item()) != ctx.world_size:
        raise RuntimeError(f"rank {ctx.rank}: connectivity check summed to {probe.item()}, "
                           f"expected {ctx.world_size}")


def run_and_share_errors(should_run, work):
    """Run `work()` on the ranks where `should_run` is true while the others wait, then
    make every rank fail if any of them failed.

    Every rank makes the same single collective call, so one rank's failure
    (a failed download, a full disk during a checkpoint save) ends the whole
    job with that rank's message instead of leaving the others at a barrier.
    """
    result, failure = None, None
    if should_run:
        try:
            result = work()
        except Exception as e:  # noqa: BLE001 - any failure must reach every rank
            failure = e
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, None if failure is None else _describe(failure))
    if failure is not None:
        raise failure
    for failed_rank, report in enumerate(reports):
        if report is not None:
            is_user_error, message = report
            raise (UserError if is_user_error else RuntimeError)(f"(from rank {failed_rank}) {message}")
    return result


def share_from_main(value):
    """Rank 0's `value` (anything picklable), on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _describe(error):
    if isinstance(error, UserError):
        return True, str(error)
    return False, f"{type(error).__name__}: {error}"


class StopSignals:
    """SIGTERM and SIGINT ask for a clean stop instead of killing the process.

    The flag rides on the next optimizer step's all-reduce, which the training
    loop reads one step later (reading it at once would make the host wait for the
    device every step): so every rank stops after the step under way and at most
    two more, rank 0 writes a checkpoint, and every process exits. Later signals
    are absorbed: under torchrun, Ctrl-C or a scheduler's SIGTERM reaches the
    workers both directly and forwarded by the agent, and the second must not cut
    the checkpoint short. A context manager: the previous handlers come back when
    training ends normally. When it ends in an error the process is on its way out,
    and torchrun's SIGTERM (sent as soon as any rank fails) must not kill it before
    it has printed why, so the handlers stay.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = None
        self.previous_handlers = {}

    def __enter__(self):
        self.previous_handlers = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is None:
            for signum, handler in self.previous_handlers.items():
                signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signal.Signals(signum).name
            # Under torchrun a SIGTERM can also mean that another rank died: then no
            # checkpoint can follow, and the loop says so when the ranks cannot meet.
            print(f"\n{self.received} received: stopping after at most two more optimizer steps, with a "
                  "checkpoint if every rank is still running", flush=True)
