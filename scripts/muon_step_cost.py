"""What an optimizer step costs with `"optimizer": "muon"` against AdamW, on this machine.

    OMP_NUM_THREADS=1 uv run python scripts/muon_step_cost.py RUN [RUN ...]

For each run's model.json: the wall time of fused AdamW's step over every parameter, as
`"optimizer": "adamw"` trains, and of Muon's step over the blocks' matrices (what `"muon"`
adds; AdamW then steps only the rest), with torch.optim.Muon's bfloat16 Newton-Schulz and
with `muon_newton_schulz_dtype` "float32". Muon's time is measured one matrix
shape at a time (a step of one matrix, after a first step that makes its state) and
multiplied by how many matrices have that shape, so that a large model's step can be
costed without running all of it. Under DDP every rank computes all of Muon's
Newton-Schulz iterations on the full matrices, so this is paid on every rank, every step
(docs/recipe.md).
"""

import collections
import dataclasses
import sys
import time
from pathlib import Path

import click
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import load_run  # noqa: E402
from gpt import GPTModel  # noqa: E402
from training import Float32Muon, make_optimizer  # noqa: E402


def step_seconds(optimizer, params):
    """The wall time of the second of two steps on random gradients (the first makes the state)."""
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        start = time.perf_counter()
        optimizer.step()
    return time.perf_counter() - start


def muon_step_seconds(muon_params, train_cfg, muon_class):
    """`muon_class`'s step over `muon_params`, as the sum over their shapes of one matrix's
    step times the matrices of that shape."""
    shapes = collections.Counter(tuple(p.shape) for p in muon_params)
    total = 0.0
    for shape, count in tqdm(shapes.items(), desc="Muon, one shape at a time", leave=False):
        matrix = torch.nn.Parameter(torch.randn(shape) * 0.02)
        muon = muon_class([matrix], lr=train_cfg.muon_learning_rate, momentum=train_cfg.muon_momentum,
                                weight_decay=train_cfg.muon_weight_decay, adjust_lr_fn=train_cfg.muon_adjust_lr)
        total += count * step_seconds(muon, [matrix])
    return total


@click.command()
@click.argument("runs", nargs=-1, required=True)
def main(runs):
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    print("| model | parameters | in Muon (matrices) | AdamW step, all parameters (s) "
          "| Muon step, its matrices, bfloat16 (s) | the same, float32 (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in runs:
        run = load_run(name)
        model = GPTModel(run.model)
        adamw = make_optimizer(model, dataclasses.replace(run.train, optimizer="adamw"))
        muon = make_optimizer(model, dataclasses.replace(run.train, optimizer="muon")).muon
        muon_params = muon.param_groups[0]["params"]
        adamw_s = step_seconds(adamw, list(model.parameters()))
        bfloat16_s = muon_step_seconds(muon_params, run.train, torch.optim.Muon)
        float32_s = muon_step_seconds(muon_params, run.train, Float32Muon)
        print(f"| {run.name} | {model.num_parameters():,} | {sum(p.numel() for p in muon_params):,} "
              f"({len(muon_params)}) | {adamw_s:.4f} | {bfloat16_s:.2f} | {float32_s:.3f} |", flush=True)


if __name__ == "__main__":
    main()
