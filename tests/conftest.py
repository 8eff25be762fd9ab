"""Shared helpers: tiny byte-level datasets from a real text, run directories, and
launching ddp_train.py for real (torchrun with gloo on CPU, or a plain process)."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from token_data import ByteTokenizer, TokenFileWriter, write_meta

PROJECT_DIR = Path(__file__).resolve().parent.parent
SHARED_DATA = PROJECT_DIR.parent / "shared" / "data"

TINY_MODEL = {"vocab_size": 257, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
              "drop_rate": 0.0, "qkv_bias": False}


def write_byte_dataset(dataset_dir, text, validation_chars=3000):
    """A byte-level dataset: the text minus its tail for train, the tail for validation."""
    dataset_dir.mkdir(parents=True, exist_ok=True)
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    for split, part in (("train", data[:-validation_chars]), ("validation", data[-validation_chars:])):
        with TokenFileWriter(dataset_dir / f"{split}.safetensors") as writer:
            writer.write(part)
            writer.commit()
    write_meta(dataset_dir, ByteTokenizer())
    return dataset_dir


@pytest.fixture(scope="session")
def verdict_dataset(tmp_path_factory):
    text = (SHARED_DATA / "the-verdict.txt").read_text()
    return write_byte_dataset(tmp_path_factory.mktemp("datasets") / "verdict", text)


MICROBATCH_SIZE = 4  # make_run's default


def tokens_for(steps, world_size, accumulation=1, microbatch=MICROBATCH_SIZE,
               context=TINY_MODEL["context_length"]):
    """min_train_tokens for exactly `steps` optimizer steps."""
    return steps * world_size * accumulation * microbatch * context


def make_run(run_dir, dataset_dir, model=None, **train):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "model.json").write_text(json.dumps({**TINY_MODEL, **(model or {})}))
    train_cfg = {"dataset": str(dataset_dir), "microbatch_size": MICROBATCH_SIZE, "use_amp": False,
                 "learning_rate": 0.003, **train}
    (run_dir / "train.json").write_text(json.dumps(train_cfg))
    return run_dir


def train_env():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


TRAINER = PROJECT_DIR / "ddp_train.py"
# ddp_train.py with the faults its environment names (see that file).
TRAINER_WITH_FAULTS = PROJECT_DIR / "tests" / "train_with_faults.py"


def run_training(args, nproc=None, check=True, timeout=240, env=None, script=TRAINER):
    """ddp_train.py (or `script`) under torchrun with `nproc` CPU processes; without `nproc`
    (a world of one) in this process unless `env` or `script` asks for a process of its own."""
    if nproc is None and env is None and script == TRAINER:
        result = train_in_process(args)
        if check and result.returncode != 0:
            raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                if nproc else [sys.executable])
    result = subprocess.run(launcher + [str(script), *map(str, args)],
                            cwd=PROJECT_DIR, env=env or train_env(), capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def start_torchrun(args, env):
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(PROJECT_DIR / "ddp_train.py"), *map(str, args)],
        cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def worker_pid(torchrun_pid, rank):
    """The pid of torchrun's worker process with that RANK, found through /proc."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError):
            continue  # a process that ended meanwhile
        if parent == torchrun_pid and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"no worker with RANK={rank} under pid {torchrun_pid}")


def wait_for(condition, job, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        if job.poll() is not None:
            output = job.stdout.read() if job.stdout else ""
            raise AssertionError(f"job ended ({job.returncode}) before the condition held:\n{output}")
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.05)


def train_in_process(args):
    """`python ddp_train.py ARGS` as a world of one, run through the same CLI in this
    process: the same code path, without paying a new interpreter's torch start-up (about
    10 s on this machine) for every run."""
    import ddp_train

    return cli_in_process(ddp_train.main, args)


def cli_in_process(command, args):
    """A distributed script's click `command` on ARGS as a world of one, in this process. One
    thread, as OMP_NUM_THREADS=1 gives the subprocesses; the torch state a run changes is put back."""
    threads, precision, rng = torch.get_num_threads(), torch.get_float32_matmul_precision(), torch.get_rng_state()
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    torch.set_num_threads(1)
    try:
        with contextlib.chdir(PROJECT_DIR):
            result = CliRunner().invoke(command, [str(a) for a in args])
    finally:
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)
        torch.set_rng_state(rng)
        for signum, handler in handlers.items():  # a run that failed leaves its stop handlers installed
            signal.signal(signum, handler)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(result.exception))  # as a crashed process would print it
    return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=stderr)


def rewind_to_checkpoint(run_dir, step, copy_to):
    """A copy of a finished run as it was right after its checkpoint of `step`: later
    checkpoints gone, `latest` and `best` on that one (metrics rows stay: the resumed run
    appends from step + 1)."""
    shutil.copytree(run_dir, copy_to, symlinks=True)
    checkpoints = copy_to / "checkpoints"
    kept = next(p.name for p in checkpoints.iterdir() if p.name.endswith(f"-iteration-{step}"))
    for later in [p for p in checkpoints.iterdir() if not p.is_symlink() and p.name != kept]:
        if int(later.name.rsplit("-", 1)[1]) > step:
            shutil.rmtree(later)
    for link in ("latest", "best"):
        (checkpoints / link).unlink(missing_ok=True)
        (checkpoints / link).symlink_to(kept)
    return copy_to


def read_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
