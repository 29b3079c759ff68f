"""Held-out evaluation sets per text domain, and dense-vs-compressed quality reports."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from .config import CalibrationConfig
from .corpus import CorpusError, TokenSplit, chunk_tokens, load_source, split_documents
from .perplexity import hidden_state_fidelity, perplexity


SELFGEN_EVAL_SEED_OFFSET = 7919


def heldout_split(tokenizer, cal: CalibrationConfig, domain: str, samples: int | None = None,
                  seq_len: int | None = None, model=None) -> TokenSplit:
    """Token chunks of ``domain`` that calibration never saw: the held-out documents when the domain was a
    calibration source (same seed, same split), else all of its documents. ``selfgen`` is sampled afresh from
    the (dense) ``model`` with a seed calibration never uses."""
    if domain == "selfgen":
        if model is None:
            raise CorpusError("the 'selfgen' evaluation domain samples text from the dense model; pass it")
        from .selfgen import selfgen_documents
        n = samples or cal.eval_samples
        docs, _ = selfgen_documents(model, tokenizer, n + 2, seq_len or cal.seq_len,
                                    cal.seed + SELFGEN_EVAL_SEED_OFFSET)
        return chunk_tokens(tokenizer, docs, seq_len or cal.seq_len, n, domain)
    docs = load_source(domain)
    if not docs:
        raise CorpusError(f"evaluation domain {domain!r} has no text on this machine")
    if domain in cal.sources:
        docs = split_documents(docs, cal.heldout_fraction, cal.seed)[1]
    return chunk_tokens(tokenizer, docs, seq_len or cal.seq_len, samples or cal.eval_samples, domain)


@dataclasses.dataclass
class DomainResult:
    domain: str
    tokens: int
    dense: float
    compressed: float

    @property
    def ratio(self) -> float:
        return self.compressed / self.dense


def compare(model: torch.nn.Module, dense: torch.nn.Module, splits: Sequence[TokenSplit], causal: bool = True,
            batch_size: int = 4) -> list[DomainResult]:
    """Perplexity (decoders) or hidden-state relative L2 error (encoders; dense = 0) per split."""
    out = []
    for sp in splits:
        if causal:
            out.append(DomainResult(sp.domain, sp.n_tokens, perplexity(dense, sp.ids, batch_size),
                                    perplexity(model, sp.ids, batch_size)))
        else:
            fid = hidden_state_fidelity(model, dense, sp.ids, batch_size)
            out.append(DomainResult(sp.domain, sp.n_tokens, 0.0, fid["rel_l2"]))
    return out
