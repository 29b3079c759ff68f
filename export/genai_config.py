"""``genai_config.json`` for an ``ort`` export folder: what ONNX Runtime GenAI (``onnxruntime_genai.Model(folder)``,
and its C / C++ / C# / Java APIs) needs to run the decoder with its own KV-cache loop and search.

:func:`genai_config` is pure: the model's transformers config (a dict) + the graph's I/O names
(:mod:`rocket_deploy.onnx_contract`) -> the dict; :func:`write_genai_config` writes it next to ``model.onnx``. The
past / present names are given as GenAI's ``%d`` patterns, checked against the graph's actual names. The
``trt``-style graph (the RocketSparseVMatMul node) needs a custom-op library: docs/export.md.
"""
from __future__ import annotations

import json
import os
from typing import Any

from rocket_deploy.onnx_contract import (ATTENTION_MASK, INPUT_IDS, LOGITS, MODEL_FILE, PAST_PREFIX, POSITION_IDS,
                                         PRESENT_PREFIX, decoder_io_names)

GENAI_CONFIG = "genai_config.json"
# transformers model_type -> GenAI model type (the decoder-only families GenAI knows; others fall back to "llama",
# whose I/O GenAI handles the same way for a plain decoder graph)
_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
          "phi3": "phi3", "phi": "phi", "granite": "granite", "olmo": "olmo", "smollm3": "smollm3"}


def _first(value):
    return value[0] if isinstance(value, (list, tuple)) else value


def genai_config(config: dict[str, Any], input_names: list[str], output_names: list[str],
                 max_length: int | None = None, filename: str = MODEL_FILE) -> dict[str, Any]:
    """The ``genai_config.json`` dict of a decoder exported with ``input_names`` / ``output_names``."""
    layers = int(config["num_hidden_layers"])
    want_in, want_out = decoder_io_names(layers)
    if list(input_names) != want_in or list(output_names) != want_out:
        raise ValueError(f"genai_config: the graph's I/O {input_names[:4]}... / {output_names[:3]}... is not the "
                         f"decoder contract of rocket_deploy/onnx_contract.py; only `ort` decoder exports run in GenAI")
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_size = int(config.get("head_dim") or config["hidden_size"] // heads)
    context = int(config.get("max_position_embeddings") or 2048)
    eos = config.get("eos_token_id")
    pad = config.get("pad_token_id")
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": filename,
        "head_size": head_size, "hidden_size": int(config["hidden_size"]),
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_hidden_layers": layers,
        "inputs": {"input_ids": INPUT_IDS, "attention_mask": ATTENTION_MASK, "position_ids": POSITION_IDS,
                   "past_key_names": f"{PAST_PREFIX}%d.key", "past_value_names": f"{PAST_PREFIX}%d.value"},
        "outputs": {"logits": LOGITS, "present_key_names": f"{PRESENT_PREFIX}%d.key",
                    "present_value_names": f"{PRESENT_PREFIX}%d.value"},
    }
    model = {"type": _TYPES.get(config.get("model_type"), "llama"), "decoder": decoder,
             "context_length": context, "vocab_size": int(config["vocab_size"]),
             "bos_token_id": _first(config.get("bos_token_id")) if config.get("bos_token_id") is not None else 0,
             "eos_token_id": eos if eos is not None else 0,
             "pad_token_id": _first(pad) if pad is not None else _first(eos if eos is not None else 0)}
    search = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": int(max_length or context),
              "min_length": 0, "top_k": 1, "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.0,
              "length_penalty": 1.0, "diversity_penalty": 0.0, "no_repeat_ngram_size": 0, "early_stopping": True,
              "past_present_share_buffer": False}
    return {"model": model, "search": search}


def write_genai_config(directory: str, config: dict[str, Any], input_names: list[str],
                       output_names: list[str]) -> str:
    """Write ``directory/genai_config.json``; returns its path."""
    path = os.path.join(directory, GENAI_CONFIG)
    with open(path, "w") as f:
        json.dump(genai_config(config, input_names, output_names), f, indent=2)
        f.write("\n")
    return path
