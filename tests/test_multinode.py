"""Two "nodes" on one machine: two torchrun launches joined by c10d rendezvous on 127.0.0.1,
one process each, must train as one process with the same tokens per step does."""

import json
import re
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import PROJECT_DIR, make_run, read_rows, run_training, tokens_for, train_env

STEPS = 6


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_node(run_dir, datasets_dir, port, env, *extra_args):
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
         "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-nodes",
         str(PROJECT_DIR / "ddp_train.py"), str(run_dir), str(datasets_dir), *extra_args],
        cwd=PROJECT_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


COMMON = dict(min_train_tokens=tokens_for(STEPS, 2), checkpoint_interval=100, shared_filesystem=True)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory):
    """The reference for the two-node runs: one process with accumulation 2, the same tokens
    per optimizer step (the demo corpus)."""
    base = tmp_path_factory.mktemp("one-process")
    one_process = make_run(base / "run", "demo", gradient_accumulation_steps=2, **COMMON)
    run_training([one_process, base / "datasets"])
    return one_process


def train_on_two_nodes(run_dir, datasets_dir):
    port = free_port()
    nodes = [launch_node(run_dir, datasets_dir, port, train_env()) for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    assert sum("Training complete" in output for output in outputs) == 1  # global rank 0 only


@pytest.mark.e2e
def test_two_nodes_train_as_one_process_does(tmp_path, one_process_run):
    """Uses the demo corpus with shared_filesystem: both nodes see one DATASETS_DIR, so only
    global rank 0 may build it (two builders would race on the same files)."""
    two_nodes = make_run(tmp_path / "two-nodes", "demo", tensorboard=True, **COMMON)
    train_on_two_nodes(two_nodes, tmp_path / "datasets")
    two_node_losses = [row["loss"] for row in read_rows(two_nodes)]
    assert len(two_node_losses) == STEPS
    assert two_node_losses == pytest.approx([row["loss"] for row in read_rows(one_process_run)], rel=1e-5)
    assert len(list((two_nodes / "checkpoints").iterdir())) == 4  # after step 0 and the last; latest, best


@pytest.mark.e2e
def test_hybrid_sharding_across_two_nodes_trains_as_ddp(tmp_path, one_process_run):
    """hsdp with one process per node: each node holds the whole (one-shard) state and the
    nodes replicate it, all-reducing gradients across the node boundary, as DDP does."""
    two_nodes = make_run(tmp_path / "two-nodes", "demo", parallelism="hsdp", **COMMON)
    train_on_two_nodes(two_nodes, tmp_path / "datasets")
    assert [row["loss"] for row in read_rows(two_nodes)] == pytest.approx(
        [row["loss"] for row in read_rows(one_process_run)], rel=1e-5)
    meta = json.loads((two_nodes / "checkpoints" / "latest" / "meta.json").read_text())
    assert meta["parallelism"] == "hsdp" and "sharded/.metadata" in meta["files"]


@pytest.mark.e2e
def test_nodes_resolving_latest_to_different_checkpoints_stop_instead_of_hanging(tmp_path, verdict_dataset):
    """Node 0's `latest` is step 5, node 1's (another copy of the run directory, as a stale
    or unshared filesystem would show it) is step 4: every rank stops with one error line."""
    node_0 = make_run(tmp_path / "node-0", verdict_dataset, min_train_tokens=tokens_for(6, 1), checkpoint_interval=2)
    run_training([node_0, "datasets"])
    node_1 = tmp_path / "node-1"
    shutil.copytree(node_0, node_1, symlinks=True)
    step_4 = next(p.name for p in (node_1 / "checkpoints").iterdir() if "iteration-4" in p.name)
    (node_1 / "checkpoints" / "latest").unlink()
    (node_1 / "checkpoints" / "latest").symlink_to(step_4)

    port = free_port()
    nodes = [launch_node(run_dir, "datasets", port, train_env(), "latest") for run_dir in (node_0, node_1)]
    outputs = [node.communicate(timeout=120)[0] for node in nodes]
    assert all(node.returncode != 0 for node in nodes), "\n".join(outputs)
    # Once from the worker, and once in torchrun's failure summary (the worker's error file).
    assert len(re.findall(r"^error: the ranks resolved the checkpoint to resume differently \(rank 0: ",
                          outputs[0], flags=re.MULTILINE)) == 1
    assert "traceback : error: the ranks resolved the checkpoint to resume differently" in outputs[0]
    assert "iteration-5" in outputs[0] and step_4 in outputs[0]
    assert 'ddp_train.py", line' not in "".join(outputs)  # no traceback from the workers (torchrun prints its own)
    assert len(read_rows(node_0)) == 6 and len(read_rows(node_1)) == 6  # neither run touched


@pytest.mark.e2e
def test_tensorboard_scalars_match_metrics_jsonl(tmp_path, verdict_dataset):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = make_run(tmp_path / "run", verdict_dataset, min_train_tokens=tokens_for(4, 1), tensorboard=True,
                       validation_interval=2, validation_batches=2)
    run_training([run_dir, "datasets"])
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    rows = read_rows(run_dir)
    logged = {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}

    def series(tag):
        return [e.step for e in logged[tag]], [e.value for e in logged[tag]]

    assert series("train/loss") == ([r["step"] for r in rows], pytest.approx([r["loss"] for r in rows]))
    assert series("train/learning_rate") == ([r["step"] for r in rows], pytest.approx([r["lr"] for r in rows]))
    validated = [r for r in rows if "val_loss" in r]
    assert series("validation/loss") == ([r["step"] for r in validated],
                                         pytest.approx([r["val_loss"] for r in validated]))
    assert {"train/grad_norm", "throughput/tokens_per_sec"} <= set(logged)
    assert json.loads((run_dir / "train.json").read_text())["tensorboard"] is True


@pytest.mark.e2e
def test_preflight_measures_the_interconnect_across_nodes_and_within_each(tmp_path):
    """Two "nodes" of two ranks each: the all-reduce is timed over all four ranks and within
    each node's two (preflight's interconnect report, as its command runs it)."""
    script = tmp_path / "interconnect.py"
    script.write_text(f"""
import json, sys
sys.path.insert(0, {str(PROJECT_DIR)!r})
import torch.distributed as dist
from distributed import init_distributed
from preflight import interconnect_report
ctx = init_distributed(timeout_minutes=5)
report = interconnect_report(ctx, gradient_bytes=4 * 2**16)
if ctx.rank == 0:
    print("REPORT", json.dumps({{"world": ctx.world_size, "local": ctx.local_world_size, **report}}), flush=True)
dist.destroy_process_group()
""")
    port = free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2", "--rdzv_backend=c10d",
         f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=interconnect", str(script)],
        cwd=PROJECT_DIR, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(2)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    line = next(line for output in outputs for line in output.splitlines() if line.startswith("REPORT "))
    report = json.loads(line.removeprefix("REPORT "))
    assert (report["world"], report["local"]) == (4, 2)
    for scope, ranks in (("all_ranks", 4), ("within_node", 2)):
        rows = report[scope]
        assert [row["bytes"] for row in rows] == [4096, 32768, 262144]  # 1/64, 1/8 and all of 256 KiB
        for row in rows:  # nccl-tests' bus bandwidth: 2(n-1)/n of the algorithm bandwidth
            assert row["busbw_gb_per_s"] == pytest.approx(row["algbw_gb_per_s"] * 2 * (ranks - 1) / ranks)
            assert row["algbw_gb_per_s"] == pytest.approx(row["bytes"] / row["seconds"] / 1e9)
