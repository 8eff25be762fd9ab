"""How the model is spread over the ranks: train.json's `"parallelism"`.

- `ddp` (the default, the reference harness's): every rank holds the whole model,
  its gradients and AdamW state (16 bytes per parameter); gradients are all-reduced.
- `fsdp` (PyTorch's FSDP2, `fully_shard`): every rank holds 1/world_size of each of
  them. Each transformer block is its own unit, all-gathered just before its forward
  and backward and freed after; gradients are reduce-scattered. The root unit holds
  the embeddings, final norm and output head (a tied head stays one parameter).
- `hsdp`: FSDP within each node, replicas across nodes (a 2-D mesh): the all-gathers
  stay on the fast intra-node links, and only a gradient all-reduce crosses nodes.

Precision under fsdp/hsdp: FSDP2's MixedPrecisionPolicy instead of autocast. The
fp32 parameters are the sharded master weights; each unit is all-gathered in bf16 and
computes in bf16 (half the all-gather traffic of fp32), and gradients are reduced in
fp32. Autocast is not stacked on top: it would only re-cast the same bf16 weights.
The difference from DDP's autocast is that activations between layers (the residual
stream) are bf16 too, as in torchtitan; the loss is still computed from fp32 logits.
"""

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from errors import UserError


@dataclass
class ParallelModel:
    """What the training step needs from a parallelism."""
    forward_model: torch.nn.Module  # what the forward pass calls (wrapped, compiled or not)
    gradient_sync: Callable  # gradient_sync(enabled) -> context for a microstep's backward
    autocast_dtype: torch.dtype | None  # for compute_loss; None where the parallelism casts itself


def is_sharded(model):
    return isinstance(model, FSDPModule)


def check_supported(train_cfg, amp_dtype, train_json):
    if train_cfg.parallelism == "ddp":
        return
    if amp_dtype == torch.float16:
        raise UserError(f"{train_json}: parallelism \"{train_cfg.parallelism}\" trains in bfloat16 or float32; "
                        "float16 would need a gradient scaler over sharded gradients, which this trainer does not "
                        "have. Set amp_dtype \"bfloat16\" (or use_amp false), or parallelism \"ddp\"")
    if train_cfg.pad_vocab_to_multiple_of != 1:
        raise UserError(f"{train_json}: key 'pad_vocab_to_multiple_of' must be 1 with parallelism "
                        f"\"{train_cfg.parallelism}\" (sharded checkpoints keep the vocabulary unpadded)")


def shard_count(train_cfg, ctx):
    """Into how many shards the weights, gradients and AdamW state are cut."""
    return {"ddp": 1, "fsdp": ctx.world_size, "hsdp": ctx.local_world_size}[train_cfg.parallelism]


def autocast_dtype_for(train_cfg, amp_dtype):
    """Autocast for DDP; FSDP's MixedPrecisionPolicy casts by itself."""
    return amp_dtype if train_cfg.parallelism == "ddp" else None


def wrap_for_training(model, train_cfg, ctx, amp_dtype):
    """The forward model and gradient-sync switch for `model` (sharded already under fsdp/hsdp)."""
    if train_cfg.parallelism == "ddp":
        ddp_model = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                        gradient_as_bucket_view=True)
        # Compiling the DDP module lets the compiler split graphs at DDP's bucket boundaries,
        # so gradient all-reduces still overlap the backward pass.
        forward_model = torch.compile(ddp_model) if train_cfg.compile else ddp_model
        return ParallelModel(forward_model, lambda enabled: nullcontext() if enabled else ddp_model.no_sync(),
                             amp_dtype)
    return ParallelModel(model, lambda enabled: _fsdp_gradient_sync(model, enabled), None)


def shard(model, train_cfg, ctx, amp_dtype):
    """Under fsdp/hsdp, before the optimizer is built: fully_shard each block, then the
    root, in the order PyTorch documents: activation checkpointing inside each block
    (GPTModel), then torch.compile per block, then FSDP."""
    mesh = device_mesh(train_cfg.parallelism, ctx)
    policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32 if amp_dtype else None)
    for block in model.trf_blocks:
        if train_cfg.compile:
            block.compile()  # in place: parameter names, and so checkpoints, stay plain
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=train_cfg.fsdp_reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def device_mesh(parallelism, ctx):
    if parallelism == "fsdp":
        return init_device_mesh(ctx.device.type, (ctx.world_size,))
    nodes, node_size = ctx.world_size // ctx.local_world_size, ctx.local_world_size
    return init_device_mesh(ctx.device.type, (nodes, node_size), mesh_dim_names=("replicate", "shard"))


@contextmanager
def _fsdp_gradient_sync(model, enabled):
    # Off: gradients accumulate unsharded on each rank, with no reduce-scatter; the
    # microstep with sync on reduce-scatters the sum once.
    model.set_requires_gradient_sync(enabled)
    yield


def clip_gradients(parameters, max_norm):
    """Scale gradients to a total 2-norm of at most `max_norm`; returns the norm before.
    Under FSDP each rank holds a shard of every gradient: the norm is over all of them
    (the shards' squares summed across ranks), so it equals DDP's."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def local_tensor(tensor):
    """This rank's shard of a sharded parameter, or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor
