"""Output sensitivity of every target layer: the mean squared gradient of the language-model loss with respect
to each output channel, ``f_j = E_tokens[(dL/dy_j)^2]`` (the diagonal Fisher of the layer's outputs).

With it, the expected loss increase of a weight error ``dW`` is about ``1/2 sum_j f_j ||X dW_:,j||^2`` -- the
whitened residual of each output column weighted by how much the loss cares about that column. This is the
"fisher" allocation objective. It needs one backward pass over the calibration set (allocation only; the
factorization itself stays backprop-free).
"""
from __future__ import annotations

import torch
from torch import nn


def output_sensitivity(model: nn.Module, targets: dict[str, nn.Linear], calib_ids: torch.Tensor,
                       batch_size: int = 4, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    if not (hasattr(model, "lm_head") or "ForCausalLM" in type(model).__name__):
        raise ValueError("the 'fisher' objective needs a causal language model (it differentiates the LM loss); "
                         "use --objective whitened-energy for encoders")
    sums = {n: torch.zeros(m.out_features, dtype=torch.float64) for n, m in targets.items()}
    count = 0
    handles = []

    def make(name):
        def hook(_mod, _gin, gout):
            g = gout[0].detach().reshape(-1, gout[0].shape[-1]).to(torch.float64)
            sums[name] += g.pow(2).sum(0).cpu()
        return hook

    for n, m in targets.items():
        handles.append(m.register_full_backward_hook(make(n)))
    was_training = model.training
    model.eval()
    req = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        for i in range(0, calib_ids.shape[0], batch_size):
            x = calib_ids[i:i + batch_size].to(device)
            emb = model.get_input_embeddings()(x).detach().requires_grad_(True)
            out = model(inputs_embeds=emb, attention_mask=torch.ones_like(x), labels=x)
            # mean loss over the batch's predicted tokens -> scale gradients back to per-token losses
            n_tok = x[:, 1:].numel()
            (out.loss * n_tok).backward()
            count += n_tok
    finally:
        for h in handles:
            h.remove()
        for p, r in req.items():
            p.requires_grad_(r)
        model.train(was_training)
    return {n: (s / max(count, 1)).float() for n, s in sums.items()}
