"""Tiny random Llama and GPT-2 checkpoints, built in-process, with a byte-level tokenizer."""
from __future__ import annotations

from pathlib import Path

import torch


def byte_tokenizer():
    """A real tokenizer with one token per byte (no hub download needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def save_tiny(kind: str, path: Path, seed: int = 0, layers: int = 2) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1)
        model = LlamaForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=layers, n_head=4, n_positions=256,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
