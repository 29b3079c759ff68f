"""Calibration text sampled from the model itself (seeded, cached on disk, recorded in the manifest).

Text the model generates covers the distribution the model actually produces, which no fixed corpus on this
machine does (ordinary prose, dialogue, lists, code); it is mixed with installed text by default.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch

from rocket_deploy.corpus import Document

# Openings that steer sampling across registers; the model writes everything after them.
PROMPTS = (
    "Once upon a time", "The history of the city", "Dear friend,", "In this article we explain",
    "Here is a simple recipe for", "The meeting started at", "Scientists have discovered", "My favourite book is",
    "How to fix a bicycle:", "The weather today", "Chapter 1\n\n", "Q: What is the capital of France?\nA:",
    "The following is a list of", "def main():", "Abstract. We study", "When I was young,",
    "The museum opened", "In economics,", "Step 1:", "The team won the match",
    "Breaking news:", "A short poem about the sea:", "The main causes of", "User: Can you help me plan a trip?\nAssistant:",
)


def cache_dir() -> str:
    return os.environ.get("ROCKET_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rocket_deploy"))


def model_fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256(type(model).__name__.encode())
    h.update(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for i, (name, p) in enumerate(model.state_dict().items()):
        if i >= 4:
            break
        h.update(name.encode())
        h.update(p.detach().float().flatten()[:4096].numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def sample_texts(model: torch.nn.Module, tokenizer, n_docs: int, new_tokens: int, seed: int,
                 temperature: float = 0.9, top_p: float = 0.95, batch_size: int = 16,
                 progress: bool = False) -> list[Document]:
    """``n_docs`` samples of ``new_tokens`` tokens, prompts cycled from :data:`PROMPTS`; ``progress``: a bar of
    sequences on stderr."""
    from tqdm.auto import tqdm
    prompts = [PROMPTS[(seed + i) % len(PROMPTS)] for i in range(n_docs)]
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    gen = torch.Generator().manual_seed(seed)
    docs = []
    bar = tqdm(total=n_docs, desc="sample calibration text", unit="seq", disable=not progress, leave=False)
    try:
        for i in range(0, n_docs, batch_size):
            chunk = prompts[i:i + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True)
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens // 2,
                                 pad_token_id=tokenizer.pad_token_id)
            for p, row in zip(chunk, out):
                text = tokenizer.decode(row, skip_special_tokens=True).strip()
                if len(text) > len(p) + 20:
                    docs.append(Document(text, "selfgen", f"sample:{p[:20]}"))
            bar.update(len(chunk))
    finally:
        bar.close()
        tokenizer.padding_side = old_side
    return docs


def selfgen_documents(model, tokenizer, n_docs: int, new_tokens: int, seed: int,
                      progress: bool = False) -> tuple[list[Document], str]:
    """Cached :func:`sample_texts` (``progress``: its bar while sampling); returns ``(documents, cache path)``."""
    key = f"{model_fingerprint(model)}-s{seed}-n{n_docs}-t{new_tokens}"
    path = os.path.join(cache_dir(), "selfgen", key + ".jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            docs = [Document(**json.loads(line)) for line in f if line.strip()]
        return docs, path
    docs = sample_texts(model, tokenizer, n_docs, new_tokens, seed, progress=progress)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d.text, "domain": d.domain, "source": d.source}) + "\n")
    os.replace(tmp, path)
    return docs, path
