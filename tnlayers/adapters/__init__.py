"""Tensorized fine-tuning adapters: ``base(x) + (alpha / rank)·ΔW x`` around frozen layers, with ΔW in
a tensor format (FLoRA's Tucker-2, LoRETTA's TT, LoRA, CP, TR) whose cores are one scale-invariant
group, so SAM, DAS and BAR act on them.

* :func:`adapt` wraps the layers named by ``target_modules`` (PEFT's rules, ``matching.py``);
* :func:`merge` / :func:`unmerge` add ΔW into the base weights in place and take it out again (bit for bit
  with ``merge(model, keep_original=True)``);
* :func:`unadapt` gives the plain layers back (``merge=True``: with ΔW folded in);
* :func:`save_adapters` / :func:`load_adapters` write the adapters alone (safetensors + a JSON config) and
  adapt a fresh base model from them, as PEFT's ``save_pretrained`` / ``from_pretrained``;
* :func:`trainable_parameters` counts trainable vs all parameters;
* :data:`PAPER_PRESETS`: the DAS paper's FLoRA / LoRETTA / LoRA settings;
* :class:`LinearAdapter`, :class:`Conv2dAdapter` (base :class:`Adapter`), :func:`named_adapters`,
  :class:`ParameterCount`, :data:`ADAPTER_FORMATS`.

At the top level, ``tnlayers.adapt``, ``tnlayers.unadapt``, ``tnlayers.trainable_parameters``,
``tnlayers.save_adapters`` and ``tnlayers.load_adapters`` are these functions, and ``tnlayers.merge_adapters``
/ ``tnlayers.unmerge_adapters`` are :func:`merge` / :func:`unmerge` (the same objects, under names that say
what they merge). An adapter's ``alpha`` is its output scale
(alpha / rank), unrelated to the ``alpha`` of DAS, BAR or GSAM.

    >>> import torch, tnlayers
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    >>> model = tnlayers.adapt(model, format="lora", rank=4, target_modules=["0"])
    >>> tnlayers.merge_adapters is tnlayers.adapters.merge
    True
    >>> type(tnlayers.unadapt(model)[0]).__name__
    'Linear'
"""
from .conv import Conv2dAdapter
from .delta import ADAPTER_FORMATS
from .adapter import Adapter
from .linear import LinearAdapter
from .model import ParameterCount, adapt, merge, named_adapters, trainable_parameters, unadapt, unmerge
from .presets import PAPER_PRESETS
from .saving import load_adapters, save_adapters

__all__ = ["adapt", "merge", "unmerge", "unadapt", "trainable_parameters", "named_adapters", "ParameterCount",
           "save_adapters", "load_adapters", "Adapter", "LinearAdapter", "Conv2dAdapter", "ADAPTER_FORMATS",
           "PAPER_PRESETS"]
