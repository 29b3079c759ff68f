"""Held-out evaluation sets per text domain, and dense-vs-compressed quality reports."""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from .config import CalibrationConfig
from .corpus import NEVER_CALIBRATED, CorpusError, TokenSplit, chunk_tokens, load_source, split_documents
from .perplexity import fidelity_vs_dense, hidden_state_fidelity


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
    kl: float | None = None              # mean KL(dense || compressed) of the next-token distribution, nats
    top1_agreement: float | None = None  # fraction of positions whose greedy token matches the dense model's

    @property
    def ratio(self) -> float:
        return self.compressed / self.dense


def compare(model: torch.nn.Module, dense: torch.nn.Module, splits: Sequence[TokenSplit], causal: bool = True,
            batch_size: int = 4) -> list[DomainResult]:
    """Per split: perplexity, KL from the dense model and top-1 agreement (decoders, one streaming pass over
    both models), or hidden-state relative L2 error (encoders; dense = 0)."""
    out = []
    for sp in splits:
        if causal:
            f = fidelity_vs_dense(model, dense, sp.ids, batch_size)
            out.append(DomainResult(sp.domain, sp.n_tokens, f["dense_perplexity"], f["perplexity"], f["kl"],
                                    f["top1_agreement"]))
        else:
            fid = hidden_state_fidelity(model, dense, sp.ids, batch_size)
            out.append(DomainResult(sp.domain, sp.n_tokens, 0.0, fid["rel_l2"]))
    return out


def expand_domains(names: Sequence[str], cal: CalibrationConfig, never_token: str = "never-calibrated") -> list[str]:
    """``names`` with ``never_token`` replaced by every built-in never-calibrated register (``NEVER_CALIBRATED``)
    that ``cal`` did not calibrate on and that has text on this machine (duplicates dropped, order kept)."""
    out: list[str] = []
    for n in names:
        if n == never_token:
            out += [d for d in NEVER_CALIBRATED if d not in cal.sources and load_source(d)]
        else:
            out.append(n)
    return list(dict.fromkeys(out))


def never_calibrated_summary(results: Sequence[DomainResult], cal: CalibrationConfig) -> dict | None:
    """Worst and mean perplexity ratio (and mean KL / top-1 agreement) over the built-in never-calibrated
    domains among ``results`` (None when there are none)."""
    rs = [r for r in results if r.domain in NEVER_CALIBRATED and r.domain not in cal.sources]
    if not rs:
        return None
    worst = max(rs, key=lambda r: r.ratio)
    return {"domains": [r.domain for r in rs], "worst_ratio": worst.ratio, "worst_domain": worst.domain,
            "mean_ratio": sum(r.ratio for r in rs) / len(rs),
            "mean_kl": sum(r.kl for r in rs) / len(rs) if all(r.kl is not None for r in rs) else None,
            "mean_top1": sum(r.top1_agreement for r in rs) / len(rs) if all(r.top1_agreement is not None for r in rs) else None}
