"""Hugging Face ``transformers.Trainer`` with the optimizers of :mod:`tnlayers.optim`.

Loaded only by ``import tnlayers.integrations.transformers`` (``import tnlayers`` never imports transformers).

* :func:`optimizer_cls_and_kwargs`: the ``(class, kwargs)`` pair for ``Trainer(optimizer_cls_and_kwargs=...)``.
  Trainer builds the optimizer itself, so its own parameter groups (weight decay on the weights, none on
  biases and LayerNorms) and its base optimizer (``args.optim``, ``learning_rate``, Adam's betas and eps,
  ``optim_args``) are kept; the tnlayers optimizer wraps that base optimizer. Trainer's scheduler, gradient
  clipping, accumulation, bf16/fp16 and checkpoints then work as with the base optimizer (the wrappers share
  its param groups and state, and save their own counters in ``optimizer.pt``, so
  ``trainer.train(resume_from_checkpoint=...)`` continues the run exactly).
* DAS and BAR take one forward/backward per step: a plain ``Trainer`` drives them.
* SAM, GSAM and X-SAM take two: :class:`SAMTrainer` runs the second pass (and X-SAM's eigenvector updates).

    >>> import tempfile, transformers
    >>> from tnlayers.integrations.transformers import optimizer_cls_and_kwargs
    >>> args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), learning_rate=1e-3, optim="adamw_torch",
    ...                                       use_cpu=True, report_to=[])
    >>> cls, kwargs = optimizer_cls_and_kwargs(args, "das", alpha=0.5)
    >>> kwargs["wrapper"].__name__, kwargs["base_optimizer"].__name__, kwargs["base_kwargs"]["lr"], kwargs["alpha"]
    ('DAS', 'AdamW', 0.001, 0.5)
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.utils import is_sagemaker_mp_enabled

from ..optim import BAR, DAS, GSAM, SAM, XSAM
from ..optim.batchnorm import disable_running_stats

__all__ = ["OPTIMIZERS", "optimizer_cls_and_kwargs", "SAMTrainer", "BuildOnTrainerGroups"]

OPTIMIZERS = {"das": DAS, "bar": BAR, "sam": SAM, "gsam": GSAM, "xsam": XSAM}
# what a Trainer optimizer handler returns for optimizers that are not one torch.optim class built on the groups
# (GaLore/Apollo: params; LOMO: model; layer-wise: optimizer_dict)
NOT_WRAPPABLE_KWARGS = ("params", "model", "optimizer_dict")


class BuildOnTrainerGroups(torch.optim.Optimizer):
    """What :func:`optimizer_cls_and_kwargs` hands Trainer: called as Trainer calls an optimizer class, with
    its param groups, it returns ``wrapper(None, base_optimizer(groups, **base_kwargs), **options)``, a plain
    DAS/BAR/SAM/GSAM/XSAM instance (never one of this class). The base optimizer is built first so that each
    keyword reaches its owner (``adam_epsilon`` becomes Adam's ``eps``). (A subclass of
    ``torch.optim.Optimizer`` because Trainer calls anything else as a factory of the whole model.)

        >>> import torch
        >>> weight = torch.nn.Parameter(torch.ones(2, 2))
        >>> opt = BuildOnTrainerGroups([{"params": [weight], "weight_decay": 0.1}], wrapper=SAM,
        ...                            base_optimizer=torch.optim.AdamW, base_kwargs={"lr": 0.1, "eps": 1e-6}, rho=0.05)
        >>> type(opt).__name__, opt.perturb_eps, opt.param_groups[0]["eps"], opt.param_groups[0]["weight_decay"]
        ('SAM', 1e-12, 1e-06, 0.1)
    """

    def __new__(cls, params: Any, wrapper: type, base_optimizer: type, base_kwargs: Dict[str, Any],
                **options: Any) -> torch.optim.Optimizer:
        return wrapper(None, base_optimizer(params, **base_kwargs), **options)


def optimizer_cls_and_kwargs(args: TrainingArguments, optimizer: Union[str, type],
                             **options: Any) -> Tuple[type, Dict[str, Any]]:
    """``(class, kwargs)`` for ``Trainer(..., optimizer_cls_and_kwargs=...)``: Trainer then builds the tnlayers
    optimizer around the base optimizer it would build without us, on its own param groups.

    ``optimizer``: ``"das"``, ``"bar"``, ``"sam"``, ``"gsam"``, ``"xsam"`` or one of those classes;
    ``options``: its own arguments (``alpha=``, ``rho=``, ``total_steps=`` ...). The base optimizer and its
    hyper-parameters come from ``args`` as in a plain Trainer (``optim``, ``learning_rate``, ``adam_beta1/2``,
    ``adam_epsilon``, ``optim_args``; ``weight_decay`` on Trainer's decay group, none on biases and
    LayerNorms). SAM, GSAM and X-SAM need :class:`SAMTrainer`.

        >>> import tempfile, transformers
        >>> args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), learning_rate=0.1, optim="sgd",
        ...                                       optim_args="momentum=0.9", use_cpu=True, report_to=[])
        >>> cls, kwargs = optimizer_cls_and_kwargs(args, "sam", rho=0.05)
        >>> kwargs["wrapper"].__name__, kwargs["base_optimizer"].__name__, kwargs["base_kwargs"], kwargs["rho"]
        ('SAM', 'SGD', {'lr': 0.1, 'momentum': 0.9}, 0.05)
    """
    if not isinstance(args, TrainingArguments):
        raise TypeError(f"args must be a transformers.TrainingArguments, got {type(args).__name__}")
    wrapper = _optimizer_class(optimizer)
    accepted = _wrapper_options(wrapper)
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"{unknown[0]}= is not an option of {wrapper.__name__} (those are "
                         f"{', '.join(sorted(accepted))}); the base optimizer's hyper-parameters come from "
                         "TrainingArguments: optim, learning_rate, adam_beta1/2, adam_epsilon, weight_decay, "
                         "optim_args")
    if wrapper in (SAM, GSAM, XSAM) and options.get("sync_first_pass", True) is not True:
        raise ValueError("sync_first_pass=False is not supported with SAMTrainer (it needs the DDP module, "
                         "which Trainer builds later); leave the default sync_first_pass=True")
    base_cls, base_kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    if not (isinstance(base_cls, type) and issubclass(base_cls, torch.optim.Optimizer)) or \
            any(k in base_kwargs for k in NOT_WRAPPABLE_KWARGS):
        raise ValueError(f"args.optim={str(args.optim)!r} is not a torch.optim optimizer built on Trainer's "
                         f"param groups, so {wrapper.__name__} cannot wrap it; use a first-order one such as "
                         "optim='adamw_torch' or optim='sgd'")
    return BuildOnTrainerGroups, {"wrapper": wrapper, "base_optimizer": base_cls, "base_kwargs": dict(base_kwargs),
                                  **options}


def _wrapper_options(wrapper: type) -> set:
    """The keyword arguments of ``wrapper`` other than its params, base optimizer and the base's kwargs."""
    parameters = inspect.signature(wrapper.__init__).parameters.values()
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name not in ("self", "params", "base_optimizer", "model")}


def _optimizer_class(optimizer: Union[str, type]) -> type:
    if isinstance(optimizer, str) and optimizer.lower() in OPTIMIZERS:
        return OPTIMIZERS[optimizer.lower()]
    if isinstance(optimizer, type) and optimizer in OPTIMIZERS.values():
        return optimizer
    raise ValueError(f"optimizer must be one of {', '.join(map(repr, OPTIMIZERS))} or one of those classes, "
                     f"got {optimizer!r}")


def _unwrapped(optimizer: Optional[torch.optim.Optimizer]) -> Optional[torch.optim.Optimizer]:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` (Trainer's ``self.optimizer`` after prepare)."""
    while optimizer is not None and not isinstance(optimizer, SAM) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class SAMTrainer(Trainer):
    """A ``transformers.Trainer`` that takes SAM, GSAM or X-SAM steps: two forward/backward passes per step.

    Build the optimizer with :func:`optimizer_cls_and_kwargs` (or pass ``optimizers=(sam, None)``); any other
    optimizer is refused at the first step. Everything else is Trainer's: its loop, scheduler, logging (the loss
    at w), checkpoints and gradient clipping, which clips SAM's gradient g̃ (the one the base step uses; X-SAM's
    correction is linear in g̃, so it is scaled with it). Trainer's callbacks between the last backward pass and
    ``optimizer.step()`` (``on_pre_optimizer_step``) see the weights at w̃.

    One optimizer step with ``gradient_accumulation_steps = n`` is one SAM step on the whole step's batch:
    Trainer's n micro-batches accumulate g, the gradient at w of the loss Trainer steps on; after the last
    one, ``first_step`` moves to w̃ = w + ρ g/||g||; the same n micro-batches (kept from the first pass) are
    run again at w̃ to accumulate g̃, with BatchNorm statistics frozen; then Trainer's ``optimizer.step()``
    restores w and takes the base step with g̃. So n micro-batches of b equal one batch of n·b (up to dropout
    masks and rounding); a step costs 2n forward/backward passes. X-SAM's eigenvector, when due, is estimated
    on the loss of the whole step (all n micro-batches in one graph) before ``first_step``. Each micro-batch
    loss is scaled as Trainer scales it; for heads that accept ``**kwargs`` but drop ``num_items_in_batch``
    (sequence classification) Trainer then sums per-micro-batch means instead of averaging them
    (transformers#47688): set ``trainer.model_accepts_loss_kwargs = False`` there.

    Refused: GSAM with gradient clipping (``max_grad_norm > 0``: its gap term would use the unclipped
    first-pass gradient next to the clipped g̃; set ``max_grad_norm=0``); DeepSpeed and SageMaker model
    parallelism (their engines take the step inside ``backward``). X-SAM needs second derivatives of the
    loss: load the model with ``attn_implementation="eager"`` (fused attention kernels have none).

        >>> import tempfile, transformers
        >>> from tnlayers.integrations.transformers import SAMTrainer, optimizer_cls_and_kwargs
        >>> model = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(
        ...     n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=8, pad_token_id=0, bos_token_id=1,
        ...     eos_token_id=1))
        >>> args = transformers.TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=2, use_cpu=True,
        ...                                       report_to=[], disable_tqdm=True, save_strategy="no")
        >>> data = [{"input_ids": torch.randint(2, 50, (8,)), "labels": i % 2} for i in range(8)]
        >>> trainer = SAMTrainer(model=model, args=args, train_dataset=data,
        ...                      optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, "sam", rho=0.05))
        >>> trainer.remove_callback(transformers.PrinterCallback)  # disable_tqdm prints the logs instead
        >>> trainer.train().global_step, type(trainer.optimizer.optimizer).__name__
        (2, 'SAM')
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._micro_batches: List[Tuple[Dict[str, Any], Any]] = []
        self._micro_batches_step = -1

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._micro_batches = []  # nothing kept from a run an exception ended
        return super().train(*args, **kwargs)

    def _sam_optimizer(self) -> SAM:
        optimizer = _unwrapped(self.optimizer)
        if not isinstance(optimizer, SAM):
            raise TypeError(f"SAMTrainer needs a SAM, GSAM or XSAM optimizer, got {type(optimizer).__name__}; pass "
                            "optimizer_cls_and_kwargs=optimizer_cls_and_kwargs(args, 'sam', ...) (DAS, BAR and "
                            "plain optimizers take one pass: use transformers.Trainer)")
        if not optimizer.sync_first_pass:
            raise ValueError("SAMTrainer does not support SAM(sync_first_pass=False); leave the default")
        if isinstance(optimizer, GSAM) and optimizer.alpha != 0 and self.args.max_grad_norm > 0:
            # Trainer clips only the second-pass gradient g̃; GSAM's gap term -alpha*g_perp comes from the
            # first-pass g, which would stay unclipped (and, under fp16, unscaled once too often)
            raise ValueError(f"GSAM under SAMTrainer needs max_grad_norm=0 (got {self.args.max_grad_norm}): "
                             "Trainer clips only SAM's gradient, not the first-pass gradient GSAM's "
                             "surrogate-gap term is built from; set TrainingArguments(max_grad_norm=0)")
        if self.is_deepspeed_enabled or is_sagemaker_mp_enabled():
            raise ValueError("SAMTrainer cannot run under DeepSpeed or SageMaker model parallelism: their engines "
                             "take the optimizer step inside backward(), leaving no room for SAM's second pass")
        return optimizer

    def training_step(self, model: nn.Module, inputs: Dict[str, Any],
                      num_items_in_batch: Optional[Union[torch.Tensor, int]] = None) -> torch.Tensor:
        """Trainer's forward/backward at w for this micro-batch; after the last micro-batch of the step, also
        the perturbation and the second pass over all of them (see the class docstring). Returns the loss at w."""
        optimizer = self._sam_optimizer()
        if self._micro_batches_step != self.state.global_step:  # a new step (or one left by an exception)
            self._micro_batches, self._micro_batches_step = [], self.state.global_step
        self._micro_batches.append((dict(inputs), num_items_in_batch))  # a copy: compute_loss may pop labels
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not self.accelerator.gradient_state.sync_gradients:
            return loss  # more micro-batches of this step to come; Trainer steps after the last one
        batches, self._micro_batches = self._micro_batches, []
        if len(batches) != self.current_gradient_accumulation_steps:
            raise RuntimeError(f"SAMTrainer saw {len(batches)} micro-batches in optimizer step "
                               f"{self.state.global_step} but Trainer accumulates "
                               f"{self.current_gradient_accumulation_steps}; this Trainer loop is not supported")
        if isinstance(optimizer, XSAM) and optimizer.eigen_update_due:
            self._update_eigenvector(optimizer, model, batches)
        optimizer.first_step(zero_grad=True)
        with disable_running_stats(model):
            for index, (batch, count) in enumerate(batches):
                # as in Trainer's loop: gradients are synchronized once, on the last micro-batch
                last = index == len(batches) - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    super().training_step(model, dict(batch), count)
        return loss

    def _update_eigenvector(self, optimizer: XSAM, model: nn.Module, batches) -> None:
        try:
            with disable_running_stats(model), self.accelerator.no_sync(model):
                optimizer.update_eigenvector(lambda: self._step_loss(model, batches))
        except RuntimeError as error:
            if "derivative for" not in str(error):
                raise
            # fused attention kernels (PyTorch's SDPA on CPU and CUDA) have no second derivative
            raise RuntimeError("XSAM's eigenvector needs Hessian-vector products (a second backward pass) of the "
                               f"model's loss, which an op of this model does not support ({error}); load the "
                               "model with attn_implementation='eager'") from error

    def _step_loss(self, model: nn.Module, batches: List[Tuple[Dict[str, Any], Any]]) -> torch.Tensor:
        """The loss whose gradient Trainer accumulates over the step, with its graph: each micro-batch's loss
        scaled as ``Trainer.training_step`` scales it before ``backward``, summed."""
        total = None
        for batch, count in batches:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, self._prepare_inputs(dict(batch)), num_items_in_batch=count)
            if self.args.n_gpu > 1:
                loss = loss.mean()
            scaled = self.loss_is_scaled_for_ga
            if scaled is None:  # already divided by the step's item count, by the model or compute_loss_func
                scaled = (self.model_accepts_loss_kwargs and count is not None) or self.compute_loss_func is not None
            if not scaled:
                loss = loss / self.current_gradient_accumulation_steps
            total = loss if total is None else total + loss
        return total
