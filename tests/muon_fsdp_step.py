"""One rank of tests/test_muon.py's FSDP check, under torchrun --nproc_per_node=2:

    torchrun --nproc_per_node=2 tests/muon_fsdp_step.py OUT [NEWTON_SCHULZ_DTYPE]

STEPS optimizer steps of `optimizer: "muon"` on the tiny model, sharded by the trainer's
parallelism.shard, each rank on its half of BATCH (FSDP averages the gradients, so the
step is the full batch's); rank 0 saves the full weights afterwards to OUT.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import ModelConfig, TrainConfig  # noqa: E402
from distributed import init_distributed  # noqa: E402
from gpt import GPTModel  # noqa: E402
from parallelism import shard  # noqa: E402
from training import make_optimizer  # noqa: E402

MODEL = ModelConfig(vocab_size=257, context_length=32, emb_dim=64, n_heads=2, n_layers=2, drop_rate=0.0)
TRAIN = {"dataset": "unused", "microbatch_size": 4, "use_amp": False, "optimizer": "muon",
         "learning_rate": 0.003, "muon_learning_rate": 0.02, "muon_weight_decay": 0.01}
STEPS = 2
SEED = 7


def batch():
    """The global batch: 8 sequences of random tokens (and their next tokens)."""
    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(0, MODEL.vocab_size, (8, MODEL.context_length + 1), generator=generator)


def initial_model():
    torch.manual_seed(SEED)
    return GPTModel(MODEL)


def main(out, newton_schulz_dtype="bfloat16"):
    ctx = init_distributed(5)
    model = initial_model()
    train_cfg = TrainConfig.from_dict({**TRAIN, "parallelism": "fsdp", "muon_newton_schulz_dtype": newton_schulz_dtype})
    shard(model, train_cfg, ctx, amp_dtype=None)
    optimizer = make_optimizer(model, train_cfg)
    tokens = batch().chunk(ctx.world_size)[ctx.rank]
    for _ in range(STEPS):
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        optimizer.found_inf = torch.zeros(())  # as the trainer steps it
        optimizer.step()
        del optimizer.found_inf
        optimizer.zero_grad(set_to_none=True)
    weights = {name: p.full_tensor() for name, p in model.named_parameters()}
    if ctx.is_main:
        torch.save(weights, out)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
