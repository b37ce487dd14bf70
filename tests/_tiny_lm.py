"""A tiny random-config GPT-2 (no download) whose output head is tied to its token embedding: the model the
embedding tests tensorize."""
import warnings

import torch


def tied_gpt2():
    """GPT-2, 1 layer, 32 wide, a 53-token vocabulary, float64, eval mode, seeded."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=53, n_positions=16,
                                     bos_token_id=0, eos_token_id=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.GPT2LMHeadModel(config).double().eval()
