"""Bridges to other libraries, each loaded only when that library is in use (never by ``import tnlayers``).

* :mod:`tnlayers.integrations.peft`: Hugging Face PEFT adapters (LoRA, LoHa, LoKr) as core groups.
* :mod:`tnlayers.integrations.transformers`: ``transformers.Trainer`` with DAS, BAR, SAM, GSAM and X-SAM.
"""
