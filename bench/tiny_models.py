"""Tiny random checkpoints of many transformers families, built in-process, with a byte-level tokenizer."""
from __future__ import annotations

from pathlib import Path

import torch


def byte_tokenizer(words: tuple[str, ...] = ()):
    """A real tokenizer with one token per byte (no hub download needed); each of `words`, after a
    space, is one token too (BPE merges), for tests that need one-token labels."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in words:
        piece = "\u0120"   # ByteLevel's space
        for ch in word:
            merges.append((piece, ch))
            piece += ch
            vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


_IDS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=1)
# Llama-shaped families share one set of sizes: hidden 32, 4 query heads over 2 KV heads.
_LLAMA_LIKE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=256, tie_word_embeddings=False, **_IDS)


def _config(kind: str, vocab: int, layers: int):
    """The config of a tiny `kind` model: every family's distinctive parts switched on."""
    import transformers as tf

    if kind == "llama":
        return tf.LlamaConfig(vocab_size=vocab, num_hidden_layers=layers, **_LLAMA_LIKE)
    if kind == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, n_positions=256, **_IDS)
    if kind == "qwen2":  # biases on q, k and v
        return tf.Qwen2Config(vocab_size=vocab, num_hidden_layers=layers, **_LLAMA_LIKE)
    if kind == "mistral":
        return tf.MistralConfig(vocab_size=vocab, num_hidden_layers=layers, sliding_window=8, **_LLAMA_LIKE)
    if kind == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(vocab_size=vocab, num_hidden_layers=layers, **_LLAMA_LIKE)
    if kind == "gemma":  # embedding scaled by sqrt(hidden) in a non-persistent buffer, tied head
        return tf.GemmaConfig(vocab_size=vocab, num_hidden_layers=layers, head_dim=8,
                              **{**_LLAMA_LIKE, "tie_word_embeddings": True})
    if kind == "gemma2":
        # Final logit soft-capping, made small enough to bend a random model's
        # small logits, so an edge that skipped it would be caught at 1e-5.
        return tf.Gemma2Config(vocab_size=vocab, num_hidden_layers=layers, head_dim=8, sliding_window=8,
                               query_pre_attn_scalar=8, final_logit_softcapping=0.5, attn_logit_softcapping=5.0,
                               **{**_LLAMA_LIKE, "tie_word_embeddings": True})
    if kind == "gemma3":
        # Gemma 3 270M's distinctive parts: one KV head, q/k RMS norms, sliding and full attention
        # interleaved (here every other block) with their own RoPE bases (10k local, 1M global),
        # embedding scaled by sqrt(hidden), tied head; no logit soft-capping, as in every Gemma 3.
        return tf.Gemma3TextConfig(vocab_size=vocab, num_hidden_layers=layers, head_dim=8, sliding_window=8,
                                   query_pre_attn_scalar=8, sliding_window_pattern=2,
                                   **{**_LLAMA_LIKE, "num_key_value_heads": 1, "tie_word_embeddings": True})
    if kind == "gpt_neox":  # fused query_key_value, parallel residual, partial rotary
        return tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.5, **_IDS)
    if kind == "falcon":  # multi-query fused query_key_value, parallel attention
        return tf.FalconConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                               max_position_embeddings=256, **_IDS)
    if kind == "opt":  # learned positions from the attention mask, blocks one level down (model.decoder)
        return tf.OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=layers,
                            num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32, **_IDS)
    if kind == "opt-proj":  # OPT-350m's layout: projections around the blocks and no final norm
        return tf.OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=64, num_hidden_layers=layers,
                            num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=16,
                            do_layer_norm_before=False, **_IDS)
    raise ValueError(f"no tiny config for {kind!r}")


# Every family the architecture matrix covers.
FAMILIES = ("llama", "gpt2", "qwen2", "mistral", "phi3", "gemma", "gemma2", "gemma3", "gpt_neox", "falcon", "opt",
            "opt-proj")


def save_tiny(kind: str, path: Path, seed: int = 0, layers: int = 2, words: tuple[str, ...] = ()) -> Path:
    from transformers import AutoModelForCausalLM

    tok = byte_tokenizer(words)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(kind, len(tok), layers))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
