"""train.json `"optimizer": "muon"`: torch.optim.Muon on the transformer blocks' weight
matrices, AdamW on the rest (training.MuonWithAdamW). Checked against torch's own Muon and
AdamW stepped side by side, a hand-written list of which parameters each one holds, runs
that resume or skip a step, and a 2-rank FSDP step against an unsharded one."""

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import microbatch_search
import muon_fsdp_step
import training
from config import ModelConfig, TrainConfig
from conftest import PROJECT_DIR, TINY_MODEL, make_run, read_rows, rewind_to_checkpoint, run_training, tokens_for, \
    train_env
from errors import UserError
from gpt import GPTModel
from training import lr_factor, make_lr_scheduler, make_optimizer, muon_parameter_names, warmup_steps_for

MUON = {"optimizer": "muon", "muon_learning_rate": 0.02, "muon_weight_decay": 0.05}
# The blocks' linear layers of either architecture, by hand: attention's four projections,
# the GELU MLP's two layers (ff.layers.0 and .2) or SwiGLU's three.
BLOCK_MATRIX = re.compile(r"trf_blocks\.\d+\.(att\.(W_query|W_key|W_value|out_proj)|ff\.(layers\.[02]|gate|up|down))"
                          r"\.weight")
ARCHITECTURES = {
    "gpt2": {},
    "gpt2-tied-head": {"tie_weights": True, "qkv_bias": True},
    "llama": {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_heads": 1, "bias": False},
    # U-net skip weights: a vector outside the blocks, AdamW's.
    "switches": {"qk_norm": True, "mlp": "relu2", "unet_skips": True, "logit_softcap": 30.0},
}


def train_config(**keys):
    return TrainConfig.from_dict({"dataset": "unused", "microbatch_size": 2, **MUON, **keys})


def tiny_model(seed=0, **keys):
    torch.manual_seed(seed)
    return GPTModel(ModelConfig(**{**TINY_MODEL, **keys}))


def groups_by_name(model, optimizer):
    name_of = {param: name for name, param in model.named_parameters()}
    return [{name_of[p] for p in group["params"]} for group in optimizer.param_groups]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_muon_holds_the_blocks_matrices_and_adamw_the_embeddings_head_norms_and_biases(architecture):
    model = tiny_model(**ARCHITECTURES[architecture])
    optimizer = make_optimizer(model, train_config())
    adamw_names, muon_names = groups_by_name(model, optimizer)
    every_name = {name for name, _ in model.named_parameters()}
    assert muon_names == {name for name in every_name if BLOCK_MATRIX.fullmatch(name)}
    assert adamw_names == every_name - muon_names
    # 2-D, and so accepted by torch.optim.Muon, yet AdamW's: the embeddings and the head.
    assert {"tok_emb.weight"} <= adamw_names and ("out_head.weight" in adamw_names) != model.cfg.tie_weights
    assert all(model.get_parameter(name).ndim == 2 for name in muon_names)
    assert [type(o) for o in (optimizer.adamw, optimizer.muon)] == [torch.optim.AdamW, torch.optim.Muon]
    assert optimizer.muon.param_groups[0]["nesterov"] and optimizer.adamw.param_groups[0]["fused"]


@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
def test_steps_equal_torch_muon_and_adamw_stepped_side_by_side_on_one_schedule(adjust_lr):
    """Three steps with warmup and cosine: the same weights, bit for bit, as torch's Muon
    and AdamW built by hand on the two parameter lists, their learning rates set each step
    to lr_factor x their own base rate (the trainer's found_inf = 0 path)."""
    train_cfg = train_config(muon_adjust_lr=adjust_lr, schedule_learning_rate=True, warmup_period_percent=34,
                             learning_rate=0.003, weight_decay=0.1, muon_momentum=0.9)
    total_steps = 3
    model, reference = tiny_model(), tiny_model()
    optimizer = make_optimizer(model, train_cfg)
    scheduler = make_lr_scheduler(optimizer, train_cfg, total_steps)
    is_muon = [BLOCK_MATRIX.fullmatch(name) is not None for name, _ in reference.named_parameters()]
    params = list(reference.parameters())
    adamw = torch.optim.AdamW([p for p, m in zip(params, is_muon) if not m], lr=0.003, weight_decay=0.1, fused=True)
    muon = torch.optim.Muon([p for p, m in zip(params, is_muon) if m], lr=0.02, weight_decay=0.05, momentum=0.9,
                            nesterov=True, adjust_lr_fn=adjust_lr)
    tokens = torch.randint(0, TINY_MODEL["vocab_size"], (4, TINY_MODEL["context_length"] + 1),
                           generator=torch.Generator().manual_seed(1))
    for step in range(total_steps):
        factor = lr_factor(step, total_steps, warmup_steps_for(total_steps, 34), 0.1)
        adamw.param_groups[0]["lr"], muon.param_groups[0]["lr"] = 0.003 * factor, 0.02 * factor
        for m in (model, reference):
            m(tokens[:, :-1], tokens[:, 1:]).backward()
        optimizer.found_inf = torch.zeros(())
        optimizer.step()
        del optimizer.found_inf
        scheduler.step()
        adamw.step()
        muon.step()
        for o in (optimizer, adamw, muon):
            o.zero_grad(set_to_none=True)
    for (name, actual), expected in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(actual, expected), name
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), tiny_model().parameters()))


def muon_in_float64(weight, gradients, lr, weight_decay, momentum, adjust_lr):
    """Muon written out from its definition (Jordan et al.; torch.optim.Muon's docs), in
    float64: Nesterov momentum, five steps of the quintic Newton-Schulz iteration with
    torch's coefficients on the wide orientation after scaling to Frobenius norm 1, the
    shape's learning-rate adjustment, decoupled weight decay. The weight after each step."""
    a, b, c = 3.4445, -4.7750, 2.0315
    weight, buffer = weight.double(), torch.zeros_like(weight, dtype=torch.float64)
    rows, columns = weight.shape
    scale = 0.2 * max(rows, columns) ** 0.5 if adjust_lr == "match_rms_adamw" else max(1, rows / columns) ** 0.5
    for gradient in gradients:
        gradient = gradient.double()
        buffer = momentum * buffer + (1 - momentum) * gradient
        update = (1 - momentum) * gradient + momentum * buffer
        x = update.T if rows > columns else update
        x = x / torch.linalg.matrix_norm(x).clamp(min=1e-7)
        for _ in range(5):
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
        update = x.T if rows > columns else x
        weight = weight * (1 - lr * weight_decay) - lr * scale * update
        yield weight


@pytest.mark.parametrize("shape", [(48, 80), (80, 48), (64, 64)])
@pytest.mark.parametrize("adjust_lr", ["original", "match_rms_adamw"])
def test_float32_newton_schulz_muon_equals_muon_written_out_in_float64(shape, adjust_lr):
    """muon_newton_schulz_dtype "float32" (training.Float32Muon) over four steps of random
    gradients against muon_in_float64: each step's change of the weight to 1e-5 relative
    (float32 rounding, amplified by five Newton-Schulz steps; measured here 1e-6 to 4e-6,
    against 1e-2 to 3e-2 for torch's bfloat16 iteration). Tall, wide and square matrices,
    both learning-rate adjustments."""
    generator = torch.Generator().manual_seed(3)
    initial = torch.randn(shape, generator=generator) * 0.05
    gradients = [torch.randn(shape, generator=generator) for _ in range(4)]
    weight = torch.nn.Parameter(initial.clone())
    muon = training.Float32Muon([weight], lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=True,
                                adjust_lr_fn=adjust_lr)
    previous = initial.double()
    for gradient, expected in zip(gradients, muon_in_float64(initial, gradients, 0.02, 0.1, 0.9, adjust_lr)):
        weight.grad = gradient.clone()
        muon.step()
        assert relative_error(weight.detach().double() - previous, expected - previous) < 1e-5
        previous = expected


def test_float32_newton_schulz_is_torch_muon_up_to_bfloat16_rounding():
    """make_optimizer with muon_newton_schulz_dtype "float32" against torch.optim.Muon (which
    iterates in bfloat16) on the same model and batches: every matrix's change over three
    steps agrees to 10% relative (bfloat16 keeps 8 bits of mantissa; measured here up to
    4%, while float32 agrees with float64 to 1e-5 above), AdamW's parameters, whose later
    steps see those matrices, to 5% (measured 0.7%), and either optimizer loads the other's
    state_dict."""
    float32 = tiny_model()
    optimizer = make_optimizer(float32, train_config(muon_newton_schulz_dtype="float32"))
    bfloat16 = tiny_model()
    reference = make_optimizer(bfloat16, train_config())
    assert type(optimizer.muon) is training.Float32Muon and type(reference.muon) is torch.optim.Muon
    initial = {name: p.detach().clone() for name, p in float32.named_parameters()}
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        tokens = torch.randint(0, TINY_MODEL["vocab_size"], (4, TINY_MODEL["context_length"] + 1),
                               generator=generator)
        for model, o in ((float32, optimizer), (bfloat16, reference)):
            model(tokens[:, :-1], tokens[:, 1:]).backward()
            o.step()
            o.zero_grad(set_to_none=True)
    actual, expected = dict(float32.named_parameters()), dict(bfloat16.named_parameters())
    matrices = muon_parameter_names(float32)
    for name in actual:
        tolerance = 0.10 if name in matrices else 0.05
        assert relative_error(actual[name] - initial[name], expected[name] - initial[name]) < tolerance, name
    optimizer.load_state_dict(reference.state_dict())
    reference.load_state_dict(optimizer.state_dict())
    assert type(optimizer.muon) is training.Float32Muon


def state_tensors(optimizer):
    return {(index, key): value.clone() for index, state in optimizer.state_dict()["state"].items()
            for key, value in state.items()}


@pytest.mark.parametrize("earlier_steps", [0, 1])
def test_a_step_flagged_non_finite_leaves_weights_and_both_optimizers_states_untouched(earlier_steps):
    """NaN gradients everywhere and found_inf = 1, as the trainer flags a non-finite step:
    nothing changes, on the first step (Muon's momentum is then zero, as if never made)
    and after a real one."""
    model = tiny_model()
    optimizer = make_optimizer(model, train_config())
    tokens = torch.randint(0, TINY_MODEL["vocab_size"], (2, TINY_MODEL["context_length"] + 1))
    for _ in range(earlier_steps):
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    states = state_tensors(optimizer)
    (model(tokens[:, :-1], tokens[:, 1:]) * float("nan")).backward()
    optimizer.found_inf = torch.ones(())
    optimizer.step()
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    after = state_tensors(optimizer)
    momentum = {key: value for key, value in after.items() if key[1] == "momentum_buffer"}
    if earlier_steps:
        assert after.keys() == states.keys() and all(torch.equal(after[k], states[k]) for k in states)
    else:  # both made their state in this step: zeros, AdamW's step count 0
        assert len(momentum) == len(optimizer.muon.param_groups[0]["params"])
        assert all(not value.any() for value in after.values())


def test_with_the_float16_gradient_scaler_an_inf_skips_both_optimizers():
    """float16 autocast steps through torch's GradScaler, which finds the inf after unscaling
    and does not step this optimizer at all; a finite step then moves both groups."""
    model = tiny_model()
    optimizer = make_optimizer(model, train_config())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    tokens = torch.randint(0, TINY_MODEL["vocab_size"], (2, TINY_MODEL["context_length"] + 1))
    weights = [p.detach().clone() for p in model.parameters()]
    for poisoned in (True, False):
        scaler.scale(model(tokens[:, :-1], tokens[:, 1:])).backward()
        if poisoned:
            model.trf_blocks[0].att.W_query.weight.grad[0, 0] = float("inf")  # a Muon matrix's gradient
        scaler.unscale_(optimizer)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        unchanged = [torch.equal(p, w) for p, w in zip(model.parameters(), weights)]
        assert all(unchanged) if poisoned else not any(unchanged)
        assert bool(optimizer.state) != poisoned


def muon_run(run_dir, dataset, steps, **train):
    return make_run(run_dir, dataset, min_train_tokens=tokens_for(steps, 1), clipping_max_norm=0.5,
                    schedule_learning_rate=True, warmup_period_percent=25, **MUON, **train)


def test_a_non_finite_loss_in_the_loop_skips_the_step_of_both_optimizers(tmp_path, verdict_dataset, monkeypatch):
    """The real loop in this process, the loss made NaN at step 1: the checkpoints of steps 0
    and 1 hold the same weights and the same optimizer.pt (AdamW's and Muon's state)."""
    run_dir = muon_run(tmp_path / "run", verdict_dataset, 3, checkpoint_interval=1)
    real_compute_loss, calls = training.compute_loss, []

    def compute_loss(*args):
        calls.append(None)
        return real_compute_loss(*args) * (float("nan") if len(calls) == 2 else 1.0)

    monkeypatch.setattr(training, "compute_loss", compute_loss)
    run_training([run_dir, "datasets"])
    assert [row["skipped"] for row in read_rows(run_dir)] == [False, True, False]
    step0, step1 = (next((run_dir / "checkpoints").glob(f"*-iteration-{step}")) for step in (0, 1))
    weights0, weights1 = load_file(step0 / "model.safetensors"), load_file(step1 / "model.safetensors")
    assert all(torch.equal(weights0[key], weights1[key]) for key in weights0)
    state0, state1 = (torch.load(d / "optimizer.pt")["state"] for d in (step0, step1))
    assert state0.keys() == state1.keys()
    assert all(torch.equal(state0[i][key], state1[i][key]) for i in state0 for key in state0[i])


def test_resumes_bit_for_bit_from_a_checkpoint_holding_both_optimizers_states(tmp_path, verdict_dataset):
    """6 steps straight, and the same run stopped after its step-3 checkpoint and resumed:
    identical losses and final weights. optimizer.pt is torch's layout over two groups:
    AdamW's (group 0) and Muon's (group 1, a momentum buffer per matrix)."""
    full = muon_run(tmp_path / "full", verdict_dataset, 6, checkpoint_interval=3)
    run_training([full, "datasets"])
    resumed = rewind_to_checkpoint(full, 3, tmp_path / "resumed")
    result = run_training([resumed, "datasets", "latest"])
    assert "global step 4" in result.stdout
    assert [r["loss"] for r in read_rows(resumed)] == [r["loss"] for r in read_rows(full)]
    weights = [load_file(run / "checkpoints" / "latest" / "model.safetensors") for run in (full, resumed)]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])

    checkpoint = full / "checkpoints" / "latest"
    assert json.loads((checkpoint / "meta.json").read_text())["optimizer"] == "muon"
    saved = torch.load(checkpoint / "optimizer.pt")
    adamw_group, muon_group = saved["param_groups"]
    assert (adamw_group["lr"] / 0.003) == pytest.approx(muon_group["lr"] / 0.02)  # one schedule
    assert muon_group["nesterov"] and muon_group["adjust_lr_fn"] == "original" and adamw_group["fused"]
    assert all(set(saved["state"][i]) == {"momentum_buffer"} for i in muon_group["params"])
    assert all(set(saved["state"][i]) == {"step", "exp_avg", "exp_avg_sq"} for i in adamw_group["params"])
    assert len(muon_group["params"]) == 12  # 2 blocks x (4 attention + 2 MLP matrices)

    train_json = resumed / "train.json"
    train_json.write_text(json.dumps({**json.loads(train_json.read_text()), "optimizer": "adamw"}))
    refused = run_training([resumed, "datasets", "latest"], check=False)
    assert refused.returncode == 2 and 'trained with optimizer "muon"' in refused.stderr


def test_a_sharded_checkpoint_resumes_bit_for_bit(tmp_path, verdict_dataset):
    """parallelism "fsdp" (a world of one, in this process): both optimizers' state goes into
    sharded/ through torch.distributed.checkpoint and comes back, so 4 steps straight and
    2 + resume + 2 give identical losses and weights (Muon's update depends on its momentum,
    so a buffer not restored would show)."""
    full = muon_run(tmp_path / "full", verdict_dataset, 4, checkpoint_interval=2, parallelism="fsdp")
    run_training([full, "datasets"])
    assert (full / "checkpoints" / "latest" / "sharded").is_dir()
    resumed = rewind_to_checkpoint(full, 2, tmp_path / "resumed")
    run_training([resumed, "datasets", "latest"])
    assert [r["loss"] for r in read_rows(resumed)] == [r["loss"] for r in read_rows(full)]
    weights = [load_file(run / "checkpoints" / "latest" / "model.safetensors") for run in (full, resumed)]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])


@pytest.mark.parametrize("keys, message", [
    ({"optimizer": "sgd"}, "key 'optimizer' must be one of \"adamw\", \"muon\""),
    ({"muon_adjust_lr": "spectral"}, "key 'muon_adjust_lr' must be one of \"original\", \"match_rms_adamw\""),
    ({"muon_momentum": 1.0}, "key 'muon_momentum' must be in [0, 1)"),
    ({"muon_newton_schulz_dtype": "float16"},
     "key 'muon_newton_schulz_dtype' must be one of \"bfloat16\", \"float32\", got \"float16\""),
    ({"muon_learning_rate": 0}, "key 'muon_learning_rate' must be positive"),
    ({"muon_weight_decay": 60.0}, "key 'muon_weight_decay' must be >= 0 and, times muon_learning_rate, below 1"),
])
def test_bad_muon_settings_are_refused_naming_the_key(keys, message):
    with pytest.raises(UserError, match=re.escape(message)):
        train_config(**keys)


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def unsharded_steps(per_shard, muon_class=torch.optim.Muon):
    """muon_fsdp_step's steps in one process with torch's Muon and AdamW; with `per_shard`,
    the mistake this test is there to catch: each half of every matrix (what a rank holds
    under FSDP with 2 ranks) orthogonalised, and its learning rate adjusted, on its own."""
    model, tokens = muon_fsdp_step.initial_model(), muon_fsdp_step.batch()
    train = muon_fsdp_step.TRAIN
    named = dict(model.named_parameters())
    matrices = [name for name in named if BLOCK_MATRIX.fullmatch(name)]
    halves = {name: [torch.nn.Parameter(half.detach().clone()) for half in named[name].chunk(2)] for name in matrices}
    adamw = torch.optim.AdamW([p for name, p in named.items() if name not in matrices], lr=train["learning_rate"],
                              weight_decay=0.1, fused=True)
    muon = muon_class([h for name in matrices for h in halves[name]] if per_shard else
                            [named[name] for name in matrices], lr=train["muon_learning_rate"],
                            weight_decay=train["muon_weight_decay"], momentum=0.95, nesterov=True)
    for _ in range(muon_fsdp_step.STEPS):
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        for name in matrices if per_shard else ():
            for half, grad in zip(halves[name], named[name].grad.chunk(2)):
                half.grad = grad.clone()
        adamw.step()
        muon.step()
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for name in matrices if per_shard else ():
                named[name].copy_(torch.cat(list(halves[name])))
    return {name: p.detach() for name, p in model.named_parameters()}, matrices


@pytest.mark.e2e
@pytest.mark.parametrize("newton_schulz_dtype, muon_class, tolerance", [
    ("bfloat16", torch.optim.Muon, 0.10), ("float32", training.Float32Muon, 1e-4)])
def test_fsdp_muon_update_equals_the_unsharded_one_not_a_per_shard_one(tmp_path, newton_schulz_dtype, muon_class,
                                                                      tolerance):
    """Two Muon steps of a model sharded by the trainer over 2 ranks (torchrun, gloo) against
    the same Muon on the whole matrices in this process: each matrix's change from its
    initial value within `tolerance` (relative, Frobenius norm) of the unsharded change.

    Why a tolerance: the sharded step sums its matmuls' partial products across ranks
    (DTensor), and its gradients come from a reduce-scatter, so the input of Newton-Schulz
    differs from the unsharded one by float32 rounding, which five iterations amplify. In
    torch's bfloat16 iteration, measured here, a relative perturbation of 1e-6 in the input
    moves the output by 2-4% of its largest element, and the sharded change differs from
    the unsharded one by about 2%: tolerance 10%. In float32 the difference is about 1e-6
    (measured): tolerance 1e-4. Orthogonalising each rank's half instead differs by 30-80%
    for every matrix of this model (asserted below with the same measure), far outside both."""
    out = tmp_path / "fsdp_weights.pt"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    str(PROJECT_DIR / "tests" / "muon_fsdp_step.py"), str(out), newton_schulz_dtype],
                   cwd=PROJECT_DIR, env=train_env(), check=True, capture_output=True, timeout=240)
    sharded = torch.load(out)
    initial = dict(muon_fsdp_step.initial_model().named_parameters())
    unsharded, matrices = unsharded_steps(per_shard=False, muon_class=muon_class)
    per_shard, _ = unsharded_steps(per_shard=True, muon_class=muon_class)
    for name in matrices:
        expected = unsharded[name] - initial[name]
        assert relative_error(sharded[name] - initial[name], expected) < tolerance, name
        assert relative_error(per_shard[name] - initial[name], expected) > 0.3, name
    for name in unsharded.keys() - set(matrices):  # AdamW's, whose second step sees the first Muon step's result
        torch.testing.assert_close(sharded[name], unsharded[name], rtol=0, atol=1e-3)


@pytest.mark.e2e
def test_two_ddp_ranks_train_as_one_process_accumulating_two_microbatches(tmp_path, verdict_dataset):
    """Muon with float32 Newton-Schulz under DDP: 2 ranks (torchrun, gloo) and one process
    with gradient accumulation 2 see the same 8 sequences a step, so their losses agree step
    by step and their final weights closely (float32 rounding of the all-reduce and of
    accumulation, which Newton-Schulz amplifies: 1e-4 relative)."""
    train = dict(global_batch_tokens=tokens_for(1, 2), min_train_tokens=tokens_for(4, 2), checkpoint_interval=100,
                 clipping_max_norm=0.5, schedule_learning_rate=True, warmup_period_percent=25,
                 muon_newton_schulz_dtype="float32", **MUON)
    ranks = make_run(tmp_path / "ranks", verdict_dataset, **train)
    one = make_run(tmp_path / "one", verdict_dataset, **train)
    run_training([ranks, "datasets"], nproc=2)
    run_training([one, "datasets"])
    ranks_rows, one_rows = read_rows(ranks), read_rows(one)
    assert len(ranks_rows) == 4 and [r["tokens"] for r in one_rows] == [r["tokens"] for r in ranks_rows]
    assert [r["loss"] for r in one_rows] == pytest.approx([r["loss"] for r in ranks_rows], rel=1e-5)
    weights = [load_file(run / "checkpoints" / "latest" / "model.safetensors") for run in (ranks, one)]
    for name in muon_parameter_names(tiny_model()):
        assert relative_error(weights[1][name], weights[0][name]) < 1e-4, name


def test_the_microbatch_search_trains_with_muon(tmp_path, verdict_dataset, monkeypatch):
    """-f builds the optimizer as training does: its trials step MuonWithAdamW (on the model
    sharded by fsdp, a world of one here). CPUs do not run out of memory, so the trial fails
    above 3 sequences (a mock of what only a GPU does) and the search that needs CUDA is let run."""
    real_make_trial, trained = microbatch_search.make_trial, []

    def make_trial(model, optimizer, *args):
        try_microbatch = real_make_trial(model, optimizer, *args)

        def try_and_record(size):
            before = [p.detach().clone() for p in optimizer.muon.param_groups[0]["params"]]
            peak = try_microbatch(size)
            trained.append(all(not torch.equal(a, p) for a, p in zip(before, optimizer.muon.param_groups[0]["params"])))
            return None if size > 3 else peak
        return try_and_record

    monkeypatch.setattr(microbatch_search, "make_trial", make_trial)
    monkeypatch.setattr(microbatch_search, "require_gpu", lambda device: None)
    run_dir = make_run(tmp_path / "run", verdict_dataset, parallelism="fsdp", microbatch_size=2, **MUON)
    result = run_training([run_dir, "datasets", "-f", "--target-global-batch", "6"])
    assert "Largest microbatch that fits on every rank: 3" in result.stdout
    assert trained and all(trained)
