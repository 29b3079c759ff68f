"""Tiny offline models and tokenizers for tests and examples (no downloads).

The tokenizer is a byte-level BPE trained in-process on standard-library docstrings, with a chat template.
"""
from __future__ import annotations

import functools

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@functools.lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .corpus import stdlib_docstrings

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    docs = [d.text for d in stdlib_docstrings(max_docs=400)]
    tok.train_from_iterator(docs, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(vocab_size: int = 512, hidden: int = 64, layers: int = 2, seed: int = 0, arch: str = "llama"):
    """A random decoder: ``arch`` in {"llama", "qwen2", "qwen3", "mistral", "gemma", "phi3"}."""
    import transformers as tf
    cfgs = {
        "llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
        "mistral": tf.MistralConfig, "gemma": tf.GemmaConfig, "phi3": tf.Phi3Config,
    }
    models = {
        "llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "qwen3": tf.Qwen3ForCausalLM,
        "mistral": tf.MistralForCausalLM, "gemma": tf.GemmaForCausalLM, "phi3": tf.Phi3ForCausalLM,
    }
    kw = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
              bos_token_id=0, eos_token_id=2, pad_token_id=3)
    if arch in ("qwen3", "gemma"):
        kw["head_dim"] = hidden // 4
    torch.manual_seed(seed)
    model = models[arch](cfgs[arch](**kw)).eval()
    return model


def tiny_bert(vocab_size: int = 512, hidden: int = 64, layers: int = 2, seed: int = 0):
    import transformers as tf
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 4,
                        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=256,
                        pad_token_id=3)
    return tf.BertModel(cfg, add_pooling_layer=False).eval()
