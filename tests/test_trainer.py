"""tnlayers' optimizers through the real ``transformers.Trainer`` (tnlayers.integrations.transformers): tiny
random-config GPT-2 and RoBERTa classifiers (nothing is downloaded) with PEFT LoRA on attention, on a synthetic
task (label: do most tokens lie in the upper half of the vocabulary). The references are written out here: a
plain-torch SAM loop, the linear warm-up schedule, the uninterrupted run for resume, one big batch for
gradient accumulation, the unscaled run for GradScaler."""
import contextlib
import gc
import math
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tnlayers.integrations.transformers import SAMTrainer, optimizer_cls_and_kwargs  # noqa: E402
from tnlayers.optim import BAR, DAS, GSAM, SAM, XSAM  # noqa: E402

VOCAB, SEQ = 64, 12
CLASSES = {"das": DAS, "bar": BAR, "sam": SAM, "gsam": GSAM, "xsam": XSAM}
OPTIONS = {"adamw": {}, "das": {"alpha": 0.5}, "bar": {"alpha": 0.5}, "sam": {"rho": 0.05}, "gsam": {"rho": 0.05},
           "xsam": {"rho": 0.05, "eig_every": 4, "eig_iters": 3}}
TWO_PASS = ("sam", "gsam", "xsam")


@pytest.fixture(autouse=True, scope="module")
def fast_tiny_runs():
    """Tiny models on a shared 2-core machine: two OpenMP threads cost ~10x the arithmetic they split. And the
    objects that exist now (transformers' and peft's, a few hundred thousand) are frozen out of the garbage
    collector: accelerate's gc.collect() at each train() and the optimizers' scan of the live PEFT layers
    (tnlayers.integrations.peft.live_tuner_layers) walk them, ~0.7 s a Trainer; models built later are found."""
    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    gc.freeze()
    yield
    gc.unfreeze()
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity(verbosity)


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


class Majority(torch.utils.data.Dataset):
    """Random token ids in [3, VOCAB) (no pad/bos/eos id); label 1 when more than half are >= VOCAB/2."""

    def __init__(self, n=64, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (n, SEQ), generator=generator)
        self.labels = ((self.ids >= VOCAB // 2).sum(1) > SEQ // 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def gpt2(dropout=0.0, attention="eager"):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=2, resid_pdrop=dropout,
                                     embd_pdrop=dropout, attn_pdrop=dropout, summary_first_dropout=dropout,
                                     attn_implementation=attention)
    model = transformers.GPT2ForSequenceClassification(config)
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True, task_type="SEQ_CLS")
    return peft.get_peft_model(model, lora)


def roberta(lora=True):
    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=40, max_position_embeddings=SEQ + 4, pad_token_id=1,
                                        bos_token_id=0, eos_token_id=2, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0, attn_implementation="eager")
    model = transformers.RobertaForSequenceClassification(config)
    if not lora:
        return model
    return peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                      task_type="SEQ_CLS"))


def arguments(path, **overrides):
    options = dict(output_dir=str(path), use_cpu=True, report_to=[], disable_tqdm=True, dataloader_num_workers=0,
                   seed=0, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1, save_strategy="no",
                   max_steps=50)
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def make_trainer(model, args, name, data=None, **kwargs):
    """Trainer for AdamW (its default) and the one-pass optimizers, SAMTrainer for the two-pass ones."""
    if name != "adamw":
        kwargs["optimizer_cls_and_kwargs"] = optimizer_cls_and_kwargs(args, name, **OPTIONS[name])
    cls = SAMTrainer if name in TWO_PASS else transformers.Trainer
    return cls(model=model, args=args, train_dataset=data if data is not None else Majority(), **kwargs)


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def trained(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_parameters(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


# -- training through Trainer ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["adamw", "das", "bar", "sam", "gsam", "xsam"])
def test_fifty_steps_through_trainer_lower_the_loss(tmp_path, name):
    # Trainer's defaults (fused AdamW as the base, linear decay, clipping at 1.0); GSAM needs no clipping
    args = arguments(tmp_path, max_steps=50 if name in ("adamw", "das", "bar", "sam") else 30,
                     **({"max_grad_norm": 0.0} if name == "gsam" else {}))
    trainer = make_trainer(gpt2(), args, name)
    trainer.train()
    optimizer = trainer.optimizer.optimizer  # accelerate's wrapper around ours
    assert type(optimizer) is (torch.optim.AdamW if name == "adamw" else CLASSES[name])
    loss = losses(trainer)
    first, last = sum(loss[:10]) / 10, sum(loss[-10:]) / 10
    print(f"{name}: mean loss of the first 10 steps {first:.3f}, of the last 10 {last:.3f}")
    assert last < first - 0.1
    if name in ("das", "bar"):  # the LoRA pairs were rescaled, not only stepped by AdamW
        cores, lambdas = optimizer.last_lambdas
        assert len(cores) == 4 and bool((lambdas != 0).any())
        assert optimizer.steps_taken == 50


@pytest.mark.parametrize("name", ["das", "sam"])
def test_roberta_with_lora_trains(tmp_path, name):
    trainer = make_trainer(roberta(), arguments(tmp_path), name)
    trainer.train()
    loss = losses(trainer)
    assert sum(loss[-10:]) / 10 < sum(loss[:10]) / 10 - 0.05


def test_trainer_builds_the_wrapper_on_its_weight_decay_groups(tmp_path):
    model = roberta(lora=False)  # full fine-tuning: biases and LayerNorms are in the model
    args = arguments(tmp_path, weight_decay=0.1, optim="adamw_torch", adam_beta2=0.98, adam_epsilon=1e-7)
    trainer = make_trainer(model, args, "sam")
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is SAM and type(optimizer.base_optimizer) is torch.optim.AdamW
    names = {id(p): n for n, p in model.named_parameters()}
    layer_norm = {f"{m}.{n}" for m, module in model.named_modules() if isinstance(module, nn.LayerNorm)
                  for n, _ in module.named_parameters()}
    expected_no_decay = {n for n in names.values() if n.endswith("bias") or n in layer_norm}
    assert len(expected_no_decay) > 10
    decay, no_decay = optimizer.param_groups
    assert {names[id(p)] for p in no_decay["params"]} == expected_no_decay
    assert {names[id(p)] for p in decay["params"]} == set(names.values()) - expected_no_decay
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert optimizer.base_optimizer.param_groups is optimizer.param_groups  # the base steps on these groups
    # each keyword reaches its owner: adam_epsilon is AdamW's eps, not SAM's (its perturbation's denominator)
    assert (decay["lr"], decay["betas"], decay["eps"], decay["rho"]) == (1e-2, (0.9, 0.98), 1e-7, 0.05)
    assert optimizer.perturb_eps == 1e-12


@pytest.mark.parametrize("how", ["optimizer_cls_and_kwargs", "optimizers"])
def test_trainer_scheduler_sets_the_lr_the_base_optimizer_steps_with(tmp_path, how):
    model = gpt2()
    args = arguments(tmp_path, max_steps=6, warmup_steps=2, lr_scheduler_type="linear", weight_decay=0.1)
    if how == "optimizers":  # built by hand, the scheduler left to Trainer
        kwargs = {"optimizers": (BAR([p for p in model.parameters() if p.requires_grad], torch.optim.AdamW,
                                     alpha=0.5, lr=1e-2), None)}
    else:
        kwargs = {"optimizer_cls_and_kwargs": optimizer_cls_and_kwargs(args, "das", alpha=0.5)}
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Majority(), **kwargs)
    seen = []
    trainer.create_optimizer()
    trainer.optimizer.base_optimizer.register_step_pre_hook(
        lambda base, *_: seen.append([g["lr"] for g in base.param_groups]))
    trainer.train()
    # linear warm-up over 2 steps, then linear decay to 0 at step 6: lr_t = lr t/2, then lr (6 - t)/4
    expected = [1e-2 * f for f in (0.0, 0.5, 1.0, 0.75, 0.5, 0.25)]
    assert len(seen) == 6
    for lrs, lr in zip(seen, expected):
        assert lrs == pytest.approx([lr] * len(lrs), abs=1e-12)


# -- checkpoints -------------------------------------------------------------------------------------------------

RESUMED = {"adamw": {}, "das": {"alpha": 0.5, "alpha_schedule": "linear", "total_steps": 12},
           "bar": {"alpha": 0.5, "total_steps": 12}, "sam": {"rho": 0.05},
           "xsam": {"rho": 0.05, "eig_every": 4, "eig_iters": 3}}


@pytest.mark.parametrize("name", list(RESUMED))
def test_resume_from_checkpoint_equals_the_uninterrupted_run(tmp_path, name, monkeypatch):
    # dropout on: Trainer saves and restores the RNG states, so even the masks continue as they would have
    monkeypatch.setitem(OPTIONS, name, RESUMED[name])
    settings = dict(max_steps=12, save_strategy="steps", save_steps=6)  # 8 steps an epoch: resumes mid-epoch
    full = make_trainer(gpt2(dropout=0.1), arguments(tmp_path / "full", **settings), name)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-6"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    if name in ("das", "bar"):  # the wrapper's step counter (alpha's schedule) travels in optimizer.pt
        assert saved["tnlayers"] == {"steps_taken": 6}
    if name == "xsam":  # v was estimated at step 4
        assert saved["tnlayers"]["xsam_steps"] == 6 and len(saved["tnlayers"]["eigenvector"]) == 5

    resumed = make_trainer(gpt2(dropout=0.1), arguments(tmp_path / "resumed", **settings), name)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 12
    assert_same_parameters(trained(resumed.model), trained(full.model))
    assert losses(resumed)[6:] == pytest.approx(losses(full)[6:], abs=1e-6, rel=0)  # steps 7-12, run again
    if name in ("das", "bar"):
        assert resumed.optimizer.optimizer.steps_taken == 12
    if name == "xsam":  # v re-estimated at step 8 by both
        assert resumed.optimizer.optimizer.eigenvalue == pytest.approx(full.optimizer.optimizer.eigenvalue, rel=1e-6)


# -- SAM: the hand-written reference, gradient accumulation ---------------------------------------------------------

def no_loss_kwargs(trainer):
    # GPT2ForSequenceClassification declares **kwargs but drops num_items_in_batch, so Trainer would not divide its
    # per-micro-batch mean loss by the accumulation steps (transformers#47688); Trainer's documented switch:
    trainer.model_accepts_loss_kwargs = False
    return trainer


@pytest.mark.parametrize("accumulation", [1, 2])
def test_sam_trainer_equals_a_hand_written_two_pass_loop(tmp_path, accumulation):
    rho, lr, steps = 0.05, 0.05, 3
    seen = []

    def collate(features):  # records the micro-batches in the order Trainer draws them
        batch = transformers.default_data_collator(features)
        seen.append({k: v.clone() for k, v in batch.items()})
        return batch

    args = arguments(tmp_path, optim="sgd", learning_rate=lr, max_steps=steps, max_grad_norm=0.0, weight_decay=0.0,
                     lr_scheduler_type="linear", per_device_train_batch_size=8 // accumulation,
                     gradient_accumulation_steps=accumulation)
    trainer = no_loss_kwargs(SAMTrainer(model=gpt2(), args=args, train_dataset=Majority(), data_collator=collate,
                                        optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, "sam", rho=rho)))
    trainer.train()
    seen = seen[:steps * accumulation]  # (the dataloader fetches one batch ahead, to see the end of the epoch)
    assert len(seen) == steps * accumulation

    # plain torch: g = gradient of the step's mean loss; w~ = w + rho g/||g||; g~ at w~; restore w; w -= lr_t g~
    model = gpt2().train()
    params = [p for p in model.parameters() if p.requires_grad]

    def step_gradient(micro_batches):
        total = [torch.zeros_like(p) for p in params]
        loss_sum = 0.0
        for batch in micro_batches:
            loss = model(**batch).loss / accumulation
            for t, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    t += g
            loss_sum += loss.item()
        return total, loss_sum

    reference_losses = []
    for t in range(steps):
        micro_batches = seen[t * accumulation:(t + 1) * accumulation]
        g, loss = step_gradient(micro_batches)
        reference_losses.append(loss)
        norm = torch.sqrt(sum(x.square().sum() for x in g))
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, x in zip(params, g):
                p += rho * x / norm
        g_tilde, _ = step_gradient(micro_batches)
        with torch.no_grad():
            for p, w, x in zip(params, saved, g_tilde):
                p.copy_(w - lr * (steps - t) / steps * x)  # linear decay to 0 at max_steps
    assert_same_parameters(trained(trainer.model), dict(zip([n for n, p in model.named_parameters()
                                                              if p.requires_grad], params)))
    assert losses(trainer) == pytest.approx(reference_losses, abs=1e-6, rel=0)  # the loss at w is logged


@pytest.mark.parametrize("name", ["adamw", "das", "bar", "sam", "gsam", "xsam"])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, name):
    # SGD (its step is proportional to the gradient, unlike Adam's) and no clipping: a wrong loss scale shows
    runs = []
    for accumulation in (1, 2):
        args = arguments(tmp_path / str(accumulation), optim="sgd", learning_rate=0.05, max_steps=4,
                         max_grad_norm=0.0, per_device_train_batch_size=8 // accumulation,
                         gradient_accumulation_steps=accumulation)
        trainer = no_loss_kwargs(make_trainer(gpt2(), args, name))
        trainer.train()
        runs.append(trainer)
    one, two = runs
    assert_same_parameters(trained(two.model), trained(one.model))
    assert losses(two) == pytest.approx(losses(one), abs=1e-6, rel=0)
    if name == "xsam":  # v of the whole step's loss: the same Hessian, micro-batched or not
        assert two.optimizer.optimizer.eigenvalue == pytest.approx(one.optimizer.optimizer.eigenvalue, rel=1e-5)


# -- mixed precision -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["das", "sam", "gsam", "xsam"])
def test_gradient_scaler_path_equals_the_unscaled_run(tmp_path, name):
    # accelerate builds a GradScaler for fp16 on GPUs only; one is given here so Trainer's scaler path (scaled
    # backward passes, scaler.step(optimizer), scaler.update()) runs on CPU. In float32 a power-of-two scale is
    # exact, so the run must match the unscaled one bit for bit.
    runs = []
    for scaled in (False, True):
        args = arguments(tmp_path / str(scaled), max_steps=6, max_grad_norm=0.0)
        trainer = make_trainer(gpt2(), args, name)
        if scaled:
            trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
        trainer.train()
        runs.append(trainer)
    plain, scaled = runs
    assert scaled.optimizer.scaler is scaled.accelerator.scaler and scaled.accelerator.scaler.get_scale() == 2.0 ** 16
    assert_same_parameters(trained(scaled.model), trained(plain.model), atol=0)


@pytest.mark.parametrize("name", ["das", "sam"])
def test_bf16_autocast_on_cpu_trains(tmp_path, name):
    trainer = make_trainer(gpt2(), arguments(tmp_path, bf16=True, max_steps=30), name)
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16"
    loss = losses(trainer)
    assert all(math.isfinite(x) for x in loss) and sum(loss[-10:]) < sum(loss[:10]) - 1.0


# -- refused -------------------------------------------------------------------------------------------------------

def test_unknown_optimizer_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="optimizer must be one of 'das', 'bar', 'sam', 'gsam', 'xsam'"):
        optimizer_cls_and_kwargs(arguments(tmp_path), "adam")
    with pytest.raises(TypeError, match="args must be a transformers.TrainingArguments, got dict"):
        optimizer_cls_and_kwargs({"learning_rate": 1e-3}, "das")


def test_options_that_trainingarguments_set_are_refused(tmp_path):
    with pytest.raises(ValueError, match="lr= is not an option of DAS .* come from TrainingArguments"):
        optimizer_cls_and_kwargs(arguments(tmp_path), "das", lr=0.1)
    with pytest.raises(ValueError, match="base_optimizer= is not an option of SAM"):
        optimizer_cls_and_kwargs(arguments(tmp_path), "sam", base_optimizer=torch.optim.SGD)
    with pytest.raises(ValueError, match="sync_first_pass=False is not supported with SAMTrainer"):
        optimizer_cls_and_kwargs(arguments(tmp_path), "sam", sync_first_pass=False)


def test_a_base_optimizer_trainer_does_not_build_on_its_groups_is_refused(tmp_path, monkeypatch):
    # what Trainer's GaLore handler returns: the class and its own params (not installed here, so imitated)
    handler = staticmethod(lambda args, model=None: (torch.optim.AdamW, {"lr": 1e-3, "params": []}))
    monkeypatch.setattr(transformers.Trainer, "get_optimizer_cls_and_kwargs", handler)
    with pytest.raises(ValueError, match="is not a torch.optim optimizer built on Trainer's param groups"):
        optimizer_cls_and_kwargs(arguments(tmp_path), "das")


def test_sam_trainer_refuses_a_one_pass_optimizer(tmp_path):
    args = arguments(tmp_path, max_steps=2)
    trainer = SAMTrainer(model=gpt2(), args=args, train_dataset=Majority(),
                         optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, "das"))
    with pytest.raises(TypeError, match="SAMTrainer needs a SAM, GSAM or XSAM optimizer, got DAS"):
        trainer.train()

    class DDPLike(nn.Module):  # what SAM(sync_first_pass=False) asks for: a module with no_sync()
        def no_sync(self):
            return contextlib.nullcontext()

    model = gpt2()
    local = SAM([p for p in model.parameters() if p.requires_grad], torch.optim.SGD, lr=0.1, sync_first_pass=False,
                model=DDPLike())
    trainer = SAMTrainer(model=model, args=args, train_dataset=Majority(), optimizers=(local, None))
    with pytest.raises(ValueError, match=r"SAMTrainer does not support SAM\(sync_first_pass=False\)"):
        trainer.train()


def test_sam_in_a_plain_trainer_fails_at_the_first_step(tmp_path):
    args = arguments(tmp_path, max_steps=2)
    trainer = transformers.Trainer(model=gpt2(), args=args, train_dataset=Majority(),
                                   optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, "sam"))
    with pytest.raises(RuntimeError, match=r"needs first_step\(\) first"):
        trainer.train()


def test_gsam_with_gradient_clipping_is_refused(tmp_path):
    trainer = make_trainer(gpt2(), arguments(tmp_path, max_steps=2), "gsam")  # max_grad_norm=1.0, the default
    with pytest.raises(ValueError, match="GSAM under SAMTrainer needs max_grad_norm=0"):
        trainer.train()


def test_xsam_without_second_derivatives_says_to_use_eager_attention(tmp_path):
    trainer = make_trainer(gpt2(attention="sdpa"), arguments(tmp_path, max_steps=2), "xsam")
    with pytest.raises(RuntimeError, match="load the model with attn_implementation='eager'"):
        trainer.train()


def test_sam_trainer_refuses_deepspeed_and_an_unexpected_loop(tmp_path):
    args = arguments(tmp_path, max_steps=2)
    trainer = make_trainer(gpt2(), args, "sam")
    trainer.create_optimizer()
    batch = transformers.default_data_collator([Majority()[i] for i in range(4)])
    trainer.is_deepspeed_enabled = True
    with pytest.raises(ValueError, match="SAMTrainer cannot run under DeepSpeed"):
        trainer.training_step(trainer.model, batch)
    trainer.is_deepspeed_enabled = False
    trainer.current_gradient_accumulation_steps = 2  # Trainer says 2 micro-batches, yet steps after the first
    with pytest.raises(RuntimeError, match="SAMTrainer saw 1 micro-batches in optimizer step 0"):
        trainer.training_step(trainer.model, batch)
