"""Output sensitivity of every target layer: the mean squared gradient of the language-model loss with respect
to each output channel, ``f_j = E_tokens[(dL/dy_j)^2]`` (the diagonal Fisher of the layer's outputs).

With it, the expected loss increase of a weight error ``dW`` is about ``1/2 sum_j f_j ||X dW_:,j||^2`` -- the
whitened residual of each output column weighted by how much the loss cares about that column. This is the
"fisher" allocation objective. It needs one backward pass over the calibration set (allocation only; the
factorization itself stays backprop-free).

On an accelerator (``offload``, the default there) the weights stay on the CPU: per batch the blocks run forward
one at a time on the device (keeping each block's input), the head's loss is differentiated with respect to the
last block's output, then every block, back on the device one at a time, is run again and differentiated in
reverse order -- the same gradients as one backward pass through the whole model, with one block's weights on
the device at a time.
"""
from __future__ import annotations

import torch
from torch import nn

from rocket_deploy.targets import find_blocks

from .calibration import _accepts_use_cache, block_on, capture_block_inputs, non_blocks_on


def sensitivity_rows(n_samples: int, wanted: int) -> torch.Tensor:
    """Indices of the ``wanted`` calibration sequences (of ``n_samples``) the sensitivity pass uses: evenly spread,
    so every source of a mixed corpus (stored one after another) is represented; all when ``wanted >= n``."""
    if wanted >= n_samples:
        return torch.arange(n_samples)
    return torch.linspace(0, n_samples - 1, wanted, dtype=torch.float64).round().long()


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_first(out, h):
    return (h, *out[1:]) if isinstance(out, (tuple, list)) else h


def output_sensitivity(model: nn.Module, targets: dict[str, nn.Linear], calib_ids: torch.Tensor,
                       batch_size: int = 4, device: str | torch.device = "cpu", progress: bool = False,
                       offload: bool | None = None) -> dict[str, torch.Tensor]:
    """``{layer: f}`` (float32, on the CPU) over ``calib_ids`` ``[n, seq]``. ``offload`` (default: when
    ``device`` is not the CPU) keeps the weights on the CPU and moves one block at a time to ``device``."""
    if not (hasattr(model, "lm_head") or "ForCausalLM" in type(model).__name__):
        raise ValueError("the 'fisher' objective needs a causal language model (it differentiates the LM loss); "
                         "use --objective whitened-energy for encoders")
    from tqdm.auto import tqdm
    device = torch.device(device)
    if offload is None:
        offload = device.type != "cpu"
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
    starts = range(0, calib_ids.shape[0], batch_size)
    bar = tqdm(starts, desc="sensitivity", unit="batch", disable=not progress, leave=False)
    try:
        for i in bar:
            x = calib_ids[i:i + batch_size].to(device)
            n_tok = x[:, 1:].numel()       # mean loss over the predicted tokens -> per-token loss gradients
            if offload:
                _offloaded_backward(model, targets, x, n_tok, device)
            else:
                emb = model.get_input_embeddings()(x).detach().requires_grad_(True)
                out = model(inputs_embeds=emb, attention_mask=torch.ones_like(x), labels=x)
                (out.loss * n_tok).backward()
            count += n_tok
    finally:
        bar.close()
        for h in handles:
            h.remove()
        for p, r in req.items():
            p.requires_grad_(r)
        model.train(was_training)
    return {n: (s / max(count, 1)).float() for n, s in sums.items()}


def _offloaded_backward(model: nn.Module, targets: dict[str, nn.Linear], x: torch.Tensor, n_tok: int,
                        device: torch.device) -> None:
    """One batch's backward pass with one block's weights on ``device`` at a time (see the module docstring);
    the backward hooks on the target layers fire as in a whole-model backward."""
    _, blocks = find_blocks(model, targets)
    kw_cache = {"use_cache": False} if _accepts_use_cache(model) else {}
    with non_blocks_on(model, blocks, device):
        cap = capture_block_inputs(model, blocks[0], iter([x]), device)
        args, kwargs = cap.args[0], cap.kwargs[0]
        hidden = [cap.hidden[0]]
        out = None
        with torch.no_grad():
            for block in blocks:
                with block_on(block, device):
                    out = block(hidden[-1], *args, **kwargs)
                hidden.append(_first(out).detach())
        last = hidden[-1].clone().requires_grad_(True)
        replay = (lambda *_a, **_k: _with_first(out, last))
        for block in blocks:          # the head on the device; every block replays the last block's output
            block.forward = replay
        try:
            with torch.enable_grad():
                loss = model(input_ids=x, attention_mask=torch.ones_like(x), labels=x, **kw_cache).loss
                (loss * n_tok).backward()
        finally:
            for block in blocks:
                del block.forward
    grad = last.grad
    for bi in range(len(blocks) - 1, -1, -1):
        with block_on(blocks[bi], device), torch.enable_grad():
            h = hidden[bi].clone().requires_grad_(True)
            _first(blocks[bi](h, *args, **kwargs)).backward(grad)
        grad = h.grad
