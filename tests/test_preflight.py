"""preflight.py in tiny form on CPU: the same code paths as on a GPU machine (gloo instead
of NCCL, a small model), in this process as a world of one and under torchrun with 2
ranks. Its arithmetic is checked against the numbers it measured, its schedule counts
against a count made here, and its projection against a real run of the same config."""

import json
import statistics
import sys
import time

import pytest

import microbatch_search
import preflight
from conftest import (PROJECT_DIR, SHARED_DATA, TINY_MODEL, cli_in_process, make_run, run_training, train_env,
                      write_byte_dataset)
from checkpointing import SMALL_FILES_BYTES
from config import ModelConfig
from evalkit import write_items
from perf import parameter_count

MODEL = {**TINY_MODEL, "context_length": 64, "emb_dim": 64, "n_heads": 4}
MICROBATCH, CONTEXT = 8, 64
STEPS = 150  # optimizer steps of the whole run
TRAIN = dict(microbatch_size=MICROBATCH, min_train_tokens=STEPS * MICROBATCH * CONTEXT, checkpoint_interval=70,
             validation_interval=40, validation_batches=4, keep_last_checkpoints=1, peak_tflops=0.001)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    text = (SHARED_DATA / "the-verdict.txt").read_text() * 12
    return write_byte_dataset(tmp_path_factory.mktemp("datasets") / "verdict-x12", text)


def snapshot(directory):
    return {p.relative_to(directory): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.rglob("*"))}


def run_preflight(run_dir, out_dir, *options, chart=True):
    outputs = ["--json", out_dir / "report.json", "--markdown", out_dir / "report.md"]
    outputs += ["--chart", out_dir / "steps.png"] if chart else []
    result = cli_in_process(preflight.main, [run_dir, "datasets", *outputs, *options])
    assert result.returncode == 0, result.stdout + result.stderr
    return result, json.loads((out_dir / "report.json").read_text())


def scheduled_by_hand(total_steps, checkpoint_interval, validation_interval):
    checkpoints = {s for s in range(total_steps) if s % checkpoint_interval == 0} | {total_steps - 1}
    validations = {s for s in range(total_steps) if s % validation_interval == 0} | checkpoints
    return len(checkpoints), len(validations)


@pytest.mark.e2e
def test_report_fields_and_arithmetic_with_and_without_compile(tmp_path, dataset):
    run_dir = make_run(tmp_path / "run", dataset, model=MODEL, **TRAIN)
    (run_dir / "checkpoints").mkdir()  # an existing run's state must stay as it is
    (run_dir / "checkpoints" / "keep.txt").write_text("untouched")
    before = snapshot(run_dir)
    result, report = run_preflight(run_dir, tmp_path, "--steps", "12", "--warmup-steps", "2",
                                   "--price-per-gpu-hour", "2.5")
    assert snapshot(run_dir) == before  # the scratch checkpoint went into a directory since removed

    run = report["run"]
    assert (run["world_size"], run["total_steps"], run["global_batch_tokens"]) == (1, STEPS, MICROBATCH * CONTEXT)
    assert run["parameters"] == parameter_count(ModelConfig.from_dict(MODEL))
    assert report["machine"]["ranks"][0]["name"].startswith("CPU ") and report["machine"]["nodes"] == 1
    assert report["interconnect"]["all_ranks"] is None  # one rank
    assert report["fit"] == {"microbatch_size": MICROBATCH, "fits": True, "peak_memory_bytes": 0, "searched": False}

    # Both compile settings, measured on the run's data.
    speeds = {speed["compile"]: speed for speed in report["speed"]}
    assert sorted(speeds) == [False, True]
    # By hand: 6 x matmul weights (2 layers x 12 x 64^2 + the 257 x 64 head) + 12 x layers x emb x context.
    flops_per_token = 6 * (2 * 12 * 64 * 64 + 257 * 64) + 12 * 2 * 64 * 64
    for speed in speeds.values():
        times = speed["step_times_s"]
        assert len(times) == 12 and all(t > 0 for t in times)
        assert speed["step_mean_s"] == pytest.approx(statistics.fmean(times))
        assert speed["step_p50_s"] == pytest.approx(statistics.median(times))
        assert speed["tokens_per_sec_per_gpu"] == pytest.approx(MICROBATCH * CONTEXT / speed["step_p50_s"])
        assert speed["mfu"] == pytest.approx(speed["tokens_per_sec_per_gpu"] * flops_per_token / 1e9)
        assert 0 <= speed["data_wait_per_step_s"] < speed["step_mean_s"]
        assert speed["peak_memory_bytes"] > 10 * 2**20  # the process's peak RSS on CPU
    assert speeds[True]["warmup_s"] > speeds[False]["warmup_s"]  # compiling
    faster = min(speeds.values(), key=lambda speed: speed["step_p50_s"])
    assert report["recommended"] == {"compile": faster["compile"], "microbatch_size": MICROBATCH,
                                     "gradient_accumulation_steps": 1}

    evaluation = report["evaluation"]
    assert evaluation["validation_s"] > 0 and evaluation["checkpoint_save_s"] > 0 and evaluation["hellaswag_s"] is None
    # Weights (fp32) and AdamW's two moments: 12 bytes per parameter, and an allowance for the small files.
    state_bytes = 12 * run["parameters"]
    assert state_bytes + SMALL_FILES_BYTES <= evaluation["checkpoint_bytes"] < state_bytes + 2 * SMALL_FILES_BYTES
    checkpoints, validations = scheduled_by_hand(STEPS, 70, 40)
    assert report["counts"] == {"validations": validations, "hellaswag_evaluations": 0, "checkpoints": checkpoints}
    disk = report["disk"]
    assert disk["checkpoints_kept"] == 2  # keep_last_checkpoints 1, plus `best`
    assert disk["checkpoints_need_bytes"] == 2 * evaluation["checkpoint_bytes"] and disk["enough"]

    for name in ("configured", "recommended"):
        projection, speed = report["projection"][name], speeds[report["projection"][name]["compile"]]
        warmup_extra = max(0.0, speed["warmup_s"] - 2 * speed["step_mean_s"])
        eta = (speed["setup_s"] + warmup_extra + STEPS * speed["step_mean_s"]
               + validations * evaluation["validation_s"] + checkpoints * evaluation["checkpoint_save_s"])
        assert projection["eta_s"] == pytest.approx(eta, rel=1e-12)
        assert projection["gpu_hours"] == projection["eta_s"] / 3600 * 1
        assert projection["cost"] == projection["gpu_hours"] * 2.5
    assert report["projection"]["configured"]["compile"] is False

    markdown = (tmp_path / "report.md").read_text()
    for section in ("# Preflight: run", "## Disk", "## Interconnect", "## Fit", "## Speed", "## Projection"):
        assert section in markdown and section in result.stdout
    assert (tmp_path / "steps.png").read_bytes().startswith(b"\x89PNG")



def timed_with_cpu_share(work):
    """(work's result, wall seconds, the share of one core this process got meanwhile)."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return result, wall, cpu / wall


@pytest.mark.e2e
def test_the_projection_matches_the_real_run_within_a_quarter(tmp_path, dataset):
    """The whole run, as configured, takes the time the projection said, within 25%.

    Both are wall-clock times of one-thread work on a machine shared with the other test
    worker, whose load changes from second to second (a torchrun starting takes a core for
    tens of seconds): the share of a core this process gets while preflight measures and
    while the run runs can differ by half. Each time is therefore taken at the share of a
    core its own phase got (wall time x share: the time on a core of its own), which takes
    that load out. What no process here can see (the virtual machine's neighbours) still
    moves single runs by 15% or so, so a second measurement and run decides when the first
    pair misses. The fixed costs the projection leaves out (loading the config, the process
    group, per-step logging) weigh more in a run of seconds than in a real one."""
    # Mostly training steps (a checkpoint's charts take about as long as 30 of them here), of a
    # model wide enough that a step outweighs the per-step logging the projection leaves out.
    steps = 300
    outcomes = []
    for attempt in range(2):
        run_dir = make_run(tmp_path / f"run-{attempt}", dataset, model={**MODEL, "emb_dim": 128}, **{
            **TRAIN, "min_train_tokens": steps * MICROBATCH * CONTEXT, "checkpoint_interval": 1000,
            "validation_interval": 100})
        (_, report), _, preflight_share = timed_with_cpu_share(
            lambda: run_preflight(run_dir, tmp_path, "--steps", "100", "--warmup-steps", "2", "--compile", "off"))
        assert report["run"]["total_steps"] == steps
        _, actual, run_share = timed_with_cpu_share(lambda: run_training([run_dir, "datasets"]))
        projected = report["projection"]["configured"]["eta_s"]
        on_own_core = (projected * preflight_share, actual * run_share)
        outcomes.append(dict(projected=projected, preflight_share=preflight_share, actual=actual, run_share=run_share))
        if abs(on_own_core[0] - on_own_core[1]) <= 0.25 * on_own_core[1]:
            return
    pytest.fail(f"projection and run, two attempts: {outcomes}")


def test_a_microbatch_that_does_not_fit_is_searched_and_the_split_measured(tmp_path, dataset, monkeypatch):
    """CPUs do not run out of memory, so the trial is made to: above 4 sequences (a mock of
    what only a GPU can do)."""
    real_make_trial = microbatch_search.make_trial

    def make_trial(*args):
        try_microbatch = real_make_trial(*args)
        return lambda size: None if size > 4 else try_microbatch(size)

    monkeypatch.setattr(microbatch_search, "make_trial", make_trial)
    run_dir = make_run(tmp_path / "run", dataset, model=MODEL, **{**TRAIN, "validation_interval": None})
    charts_before = sorted(PROJECT_DIR.glob("*.png"))
    result, report = run_preflight(run_dir, tmp_path, "--steps", "2", "--warmup-steps", "1", "--compile", "off",
                                   chart=False)
    # Without --chart no chart is drawn, in the working directory (the project's) or anywhere.
    assert sorted(PROJECT_DIR.glob("*.png")) == charts_before and not list(tmp_path.rglob("*.png"))
    fit = report["fit"]
    assert (fit["fits"], fit["searched"], fit["largest_microbatch"]) == (False, True, 4)
    assert fit["suggested"] == {"microbatch_size": 4, "gradient_accumulation_steps": 2}  # the same 8 sequences
    assert report["run"]["total_steps"] == STEPS and report["run"]["global_batch_tokens"] == MICROBATCH * CONTEXT
    assert report["projection"]["configured"] == {"unavailable": "the configured microbatch does not fit"}
    assert report["projection"]["recommended"]["microbatch_size"] == 4
    assert report["recommended"]["gradient_accumulation_steps"] == 2
    assert report["evaluation"]["validation_s"] is None
    assert "does **not** fit" in result.stdout and "microbatch_size 4, gradient_accumulation_steps 2" in result.stdout
    assert json.loads((run_dir / "train.json").read_text())["microbatch_size"] == MICROBATCH  # not rewritten


def test_an_output_path_in_a_missing_directory_is_refused_before_any_work(tmp_path, dataset):
    run_dir = make_run(tmp_path / "run", dataset, model=MODEL, **TRAIN)
    result = cli_in_process(preflight.main, [run_dir, "datasets", "--json", tmp_path / "no-such-dir" / "r.json"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'no-such-dir' / 'r.json'}: its directory "
                                                  "does not exist"]


@pytest.mark.e2e
def test_two_ranks_under_fsdp_measure_the_interconnect_and_rank_0_alone_reports(tmp_path, dataset):
    import subprocess

    run_dir = make_run(tmp_path / "run", dataset, model=MODEL, parallelism="fsdp", hellaswag_interval=50,
                       hellaswag_data=str(write_items(tmp_path / "hellaswag_val.jsonl")), **TRAIN)
    before = snapshot(run_dir)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(PROJECT_DIR / "preflight.py"), str(run_dir), "datasets", "--steps", "2", "--warmup-steps", "1",
         "--compile", "off", "--json", str(tmp_path / "report.json"), "--chart", str(tmp_path / "steps.png")],
        cwd=PROJECT_DIR, env=train_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("# Preflight: run") == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert [rank["rank"] for rank in report["machine"]["ranks"]] == [0, 1]
    assert report["run"]["parallelism"] == "fsdp" and report["run"]["total_steps"] == STEPS // 2
    gradient_bytes = 4 * report["run"]["parameters"]
    rows = report["interconnect"]["all_ranks"]
    assert [row["bytes"] for row in rows] == [int(gradient_bytes * f) // 4 * 4 for f in (1 / 64, 1 / 8, 1)]
    for row in rows:
        assert row["busbw_gb_per_s"] == pytest.approx(row["algbw_gb_per_s"])  # 2(n-1)/n = 1 for 2 ranks
        assert row["algbw_gb_per_s"] == pytest.approx(row["bytes"] / row["seconds"] / 1e9)
    assert report["interconnect"]["within_node"] is None  # one node
    assert report["evaluation"]["checkpoint_save_s"] > 0  # the sharded save, every rank writing its shards
    assert report["evaluation"]["hellaswag_s"] > 0
    assert report["counts"]["hellaswag_evaluations"] == len({0, 50, STEPS // 2 - 1})  # every 50 steps, and the last
    assert snapshot(run_dir) == before


def test_the_gpu_check_script_parses_and_every_command_it_runs_takes_its_options():
    """scripts/gpu_check.sh needs a GPU to run; here: bash accepts it, and each script it
    starts parses the arguments it is given (an option renamed since would fail here)."""
    import shlex
    import subprocess

    import click

    script = PROJECT_DIR / "scripts" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text().replace("\\\n", " ")
    bench = shlex.split(next(line for line in text.splitlines() if line.startswith("BENCH="))[len("BENCH="):])[0]
    variables = {"$BENCH": bench, "$PY": "", '"$RUN"': "/tmp/run", '"$WORK_DIR/datasets"': "/tmp/datasets",
                 '"$OUT_DIR/': '"/tmp/'}
    commands = []
    for line in text.splitlines():
        if line.startswith("step "):
            for name, value in variables.items():
                line = line.replace(name, value)
            commands.append(shlex.split(line)[3:])  # after `step NAME LIMIT`
    assert [command[0] for command in commands] == ["bench.py"] * 4 + ["ddp_train.py", "preflight.py",
                                                                      "ddp_train.py", "bench.py"]
    for script_name, *args in commands:
        module = __import__(script_name.removesuffix(".py"))
        with module.main.make_context(script_name, list(args)) as context:  # raises on an unknown option
            assert context.params
    with pytest.raises(click.NoSuchOption):  # what a renamed option does
        bench_module = __import__("bench")
        bench_module.main.make_context("bench.py", ["model.json", "--no-such-option"])
