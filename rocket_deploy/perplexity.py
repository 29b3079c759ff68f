"""Quality metrics on held-out token chunks."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def next_token_nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token negative log-likelihood of ``ids`` ([b, seq]) under ``logits`` ([b, seq, vocab])."""
    logits = logits.float()
    return float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 4, device: str | torch.device = "cpu") -> float:
    """exp(mean next-token negative log-likelihood) over all predicted positions of ``ids`` ([n, seq])."""
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, ids.shape[0], batch_size):
        x = ids[i:i + batch_size].to(device)
        nll += next_token_nll_sum(model(input_ids=x, attention_mask=torch.ones_like(x)).logits, x)
        count += x[:, 1:].numel()
    return math.exp(nll / count)


def distribution_stats(logits: torch.Tensor, ref_logits: torch.Tensor) -> tuple[float, int]:
    """Over the predicted positions (all but the last) of ``[b, seq, vocab]`` logits: the summed
    ``KL(ref || logits)`` of the next-token distributions (nats) and the number of positions where the greedy
    (top-1) token agrees with the reference's."""
    lp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    lq = F.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    kl = float((lq.exp() * (lq - lp)).sum())
    agree = int((lp.argmax(-1) == lq.argmax(-1)).sum())
    return kl, agree


@torch.no_grad()
def fidelity_vs_dense(model: torch.nn.Module, dense: torch.nn.Module, ids: torch.Tensor, batch_size: int = 4,
                      device: str | torch.device = "cpu") -> dict[str, float]:
    """One pass over ``ids`` ([n, seq]) for a causal LM and its dense reference, batch by batch (no full-set
    logits are held): both perplexities, the mean ``KL(dense || model)`` of the next-token distribution (nats
    per predicted token) and the top-1 agreement with the dense model's greedy token (fraction)."""
    model.eval()
    dense.eval()
    nll = nll_d = kl = 0.0
    agree = count = 0
    for i in range(0, ids.shape[0], batch_size):
        x = ids[i:i + batch_size].to(device)
        mask = torch.ones_like(x)
        lg = model(input_ids=x, attention_mask=mask).logits
        ld = dense(input_ids=x, attention_mask=mask).logits
        nll += next_token_nll_sum(lg, x)
        nll_d += next_token_nll_sum(ld, x)
        k, a = distribution_stats(lg, ld)
        kl += k
        agree += a
        count += x[:, 1:].numel()
        del lg, ld
    return {"perplexity": math.exp(nll / count), "dense_perplexity": math.exp(nll_d / count),
            "kl": kl / count, "top1_agreement": agree / count, "tokens": count}


@torch.no_grad()
def hidden_state_fidelity(model: torch.nn.Module, reference: torch.nn.Module, ids: torch.Tensor,
                          batch_size: int = 4) -> dict[str, float]:
    """For encoders: relative L2 error and mean cosine similarity of ``last_hidden_state`` vs the dense model."""
    err_num = err_den = 0.0
    cos_sum, n = 0.0, 0
    for i in range(0, ids.shape[0], batch_size):
        x = ids[i:i + batch_size]
        m = torch.ones_like(x)
        a = model(input_ids=x, attention_mask=m).last_hidden_state.float()
        b = reference(input_ids=x, attention_mask=m).last_hidden_state.float()
        err_num += float((a - b).pow(2).sum())
        err_den += float(b.pow(2).sum())
        cos_sum += float(F.cosine_similarity(a, b, dim=-1).sum())
        n += a.shape[0] * a.shape[1]
    return {"rel_l2": math.sqrt(err_num / max(err_den, 1e-30)), "cosine": cos_sum / max(n, 1)}
