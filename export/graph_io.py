"""What the exported graph takes and returns: the flat-tensor wrappers torch.export traces, their I/O names, the
tracing inputs and the dynamic axes -- all named by :mod:`rocket_deploy.onnx_contract` (Optimum's layout)::

    decoder inputs : input_ids [batch_size, sequence_length] int64, attention_mask [batch_size,
                     total_sequence_length] int64, position_ids [batch_size, sequence_length] int64,
                     past_key_values.{i}.key / .value [batch_size, kv_heads, past_sequence_length, head_dim]
    decoder outputs: logits [batch_size, sequence_length, vocab], present.{i}.key / .value
                     [batch_size, kv_heads, past_sequence_length + sequence_length, head_dim]
    encoder        : input_ids, attention_mask (+ token_type_ids when the model's forward takes them)
                     [batch_size, sequence_length] -> last_hidden_state
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from rocket_deploy.hf_compat import cache_kwarg
from rocket_deploy.onnx_contract import (DIM_BATCH, DIM_PAST, DIM_SEQ, DIM_TOTAL, TOKEN_TYPE_IDS, decoder_io_names,
                                         encoder_io_names)


def is_decoder_model(model: nn.Module) -> bool:
    return hasattr(model, "lm_head") or "ForCausalLM" in type(model).__name__


def decoder_geometry(config) -> tuple[int, int, int]:
    """(num_layers, kv_heads, head_dim) of a decoder config."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(layers), int(kv), int(head_dim)


def takes_token_type_ids(model: nn.Module) -> bool:
    """An encoder whose forward takes ``token_type_ids`` (BERT-style): exported with that input."""
    return not is_decoder_model(model) and TOKEN_TYPE_IDS in inspect.signature(model.forward).parameters


def io_names(model: nn.Module) -> tuple[list[str], list[str]]:
    if not is_decoder_model(model):
        return encoder_io_names(token_type_ids=takes_token_type_ids(model))
    return decoder_io_names(decoder_geometry(model.config)[0])


class DecoderWrapper(nn.Module):
    """Flat tensors in / out around a causal LM with a DynamicCache (what torch.export traces)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.n_layers = decoder_geometry(model.config)[0]
        self.cache_arg = cache_kwarg(model)   # torch-side keyword only; the graph keeps the past_key_values.* names

    def forward(self, input_ids, attention_mask, position_ids, past: list[torch.Tensor]):
        from transformers import DynamicCache
        cache = DynamicCache(config=self.model.config)
        for i in range(self.n_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **{self.cache_arg: cache})
        present = []
        for layer in getattr(out, self.cache_arg).layers:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


class EncoderWrapper(nn.Module):
    """``last_hidden_state`` of an encoder; ``token_type_ids`` passed on when given (see :func:`takes_token_type_ids`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kw = {} if token_type_ids is None else {TOKEN_TYPE_IDS: token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state


def wrapper_for(model: nn.Module) -> nn.Module:
    return DecoderWrapper(model) if is_decoder_model(model) else EncoderWrapper(model)


def example_inputs(model: nn.Module, batch: int = 2, seq: int = 3, past: int = 4, dtype=torch.float32):
    """Tracing inputs: sizes >= 2 so that torch.export keeps every axis symbolic."""
    vocab = int(getattr(model.config, "vocab_size", 100))
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    if not is_decoder_model(model):
        mask = torch.ones(batch, seq, dtype=torch.int64)
        return (ids, mask, torch.zeros(batch, seq, dtype=torch.int64)) if takes_token_type_ids(model) else (ids, mask)
    n, kv, hd = decoder_geometry(model.config)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq, dtype=torch.int64).expand(batch, seq).contiguous()
    pkv = [torch.zeros(batch, kv, past, hd, dtype=dtype) for _ in range(2 * n)]
    return (ids, mask, pos, pkv)


def dynamic_shapes(model: nn.Module):
    """torch.export dynamic axes of :func:`example_inputs`; the Dim names become the graph's dim params."""
    Dim = torch.export.Dim
    batch, seq = Dim(DIM_BATCH), Dim(DIM_SEQ)
    if not is_decoder_model(model):
        return tuple({0: batch, 1: seq} for _ in io_names(model)[0])
    n = decoder_geometry(model.config)[0]
    past = Dim(DIM_PAST, min=0)
    total = Dim(DIM_TOTAL)
    return ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, [{0: batch, 2: past} for _ in range(2 * n)])
