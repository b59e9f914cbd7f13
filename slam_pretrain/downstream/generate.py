"""Sampling text from a checkpoint or an export (``slam-pretrain generate``).

Decoding uses the exact KV cache of kv_cache.py: the prompt is one forward pass (prefill), then
every new token runs each block on that token alone, so a step costs O(context) in the two full
blocks and O(S) in the EF blocks instead of a forward pass over the whole context. ``use_cache=False``
(``--no-cache``) keeps the recompute path as a reference; both give the same tokens (the model is
prefix-consistent, shared/spec/slam_model.md revision 2). Models with fractional segment layouts
(``segment_len: 0.6``, the prototype's) are not prefix-consistent: they always recompute, and say so.

The context never exceeds ``model.max_seq_len``: a longer prompt keeps its last max_seq_len - 1
tokens, and when the context fills up it keeps its last max_seq_len // 2 tokens (a new window,
positions from 0 again; with the cache, one prefill) and generation goes on. Both paths window the
same way. Temperature 0 is greedy decoding (deterministic); otherwise sampling uses a
``torch.Generator`` seeded with ``seed``, so a seed reproduces its text on the same device.
Generation stops after ``max_new_tokens`` or at the first EOS.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Optional

import torch

from slam_pretrain.errors import UserError
from slam_pretrain.downstream.export import load_model


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """Raise UserError naming the flag when a sampling setting is out of range."""
    if max_new_tokens < 0:
        raise UserError(f"--max-new-tokens {max_new_tokens} is invalid: must be >= 0")
    if not temperature >= 0:  # also rejects NaN
        raise UserError(f"--temperature {temperature} is invalid: must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise UserError(f"--top-k {top_k} is invalid: must be >= 0 (0 = off)")
    if not 0.0 < top_p <= 1.0:
        raise UserError(f"--top-p {top_p} is invalid: must be in (0, 1] (1 = off)")


def next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: Optional[torch.Generator]) -> int:
    """Pick a token from the last position's ``logits[V]`` (greedy when temperature is 0)."""
    logits = logits.float()
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already hold top_p of the mass (the first stays).
        drop = torch.cumsum(probs, dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


Notify = Callable[[str], None]


def uses_cache(model: torch.nn.Module, use_cache: bool, notify: Optional[Notify] = None) -> bool:
    """Whether decoding can use the KV cache (says why not, once: a fractional layout, or document masking)."""
    cfg = model.config
    if use_cache and not cfg.prefix_consistent:
        if notify:
            notify(f"[generate] recomputing the whole context for every token: model.segment_len="
                   f"{cfg.segment_len!r}/overlap={cfg.overlap!r} are fractions of the sequence length, so the "
                   f"EF layout moves with it and no exact KV cache exists (use token segment lengths for one)")
        return False
    if use_cache and getattr(cfg, "doc_masking", False):
        if notify:
            notify("[generate] recomputing the whole context for every token: model.doc_masking is on and the "
                   "KV cache does not apply document masks")
        return False
    return use_cache


@torch.no_grad()
def generate_batch(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float = 1.0,
                   top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: Optional[int] = None,
                   use_cache: bool = True, notify: Optional[Notify] = _stderr) -> list[list[int]]:
    """Continue each token list of ``prompts`` (lengths may differ); returns the new tokens of each
    (a row stops early at ``eos_id``). Rows are sampled in order from one seeded generator, so a
    batch of one reproduces ``generate_ids``."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if not prompts or any(not p for p in prompts):
        raise UserError("the prompt encodes to no tokens and there is no EOS token to start from")
    device = next(model.parameters()).device
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    max_len = model.config.max_seq_len
    keep = max(1, max_len // 2)  # tokens a full window keeps
    cached = uses_cache(model, use_cache, notify)
    if any(len(p) > max_len - 1 for p in prompts) and notify:
        notify(f"[generate] the prompt is longer than model.max_seq_len - 1 = {max_len - 1} tokens: "
               f"keeping its last {max_len - 1}")
    windows = [list(p[-(max_len - 1):]) if max_len > 1 else list(p[-1:]) for p in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    was_training = model.training
    model.eval()
    told = False
    try:
        cache = logits = None
        for _ in range(max_new_tokens):
            if cached and (cache is None or any(len(w) >= max_len for w in windows)):
                if cache is not None:  # a window filled up: restart the windows, one prefill
                    windows = [w[-keep:] if len(w) >= max_len else w for w in windows]
                logits, cache = _prefill(model, windows, max_len)
            elif not cached:
                windows = [w[-keep:] if len(w) >= max_len else w for w in windows]
                logits = torch.stack([model(torch.tensor([w], dtype=torch.long, device=device))[0, -1]
                                      for w in windows])  # [B, V]
            step = []
            for r in range(len(prompts)):
                tok = next_token(logits[r], temperature, top_k, top_p, generator)
                if eos_id is not None and tok == eos_id:
                    done[r] = True
                if not done[r]:
                    new[r].append(tok)
                step.append(tok)
            if all(done):
                break
            for r, tok in enumerate(step):
                windows[r].append(tok)
            if any(len(w) >= max_len for w in windows) and not told and notify:
                told = True
                notify(f"[generate] the context reached model.max_seq_len={max_len}: continuing from its "
                       f"last {keep} tokens (positions restart at 0)")
            if cached and not any(len(w) >= max_len for w in windows):
                logits = _decode(model, cache, torch.tensor(step, dtype=torch.long, device=device))
    finally:
        model.train(was_training)
    return new


def _prefill(model: torch.nn.Module, windows: list[list[int]], capacity: int):
    from slam_pretrain.model.kv_cache import prefill

    return prefill(model, windows, capacity)


def _decode(model: torch.nn.Module, cache: Any, tokens: torch.Tensor) -> torch.Tensor:
    from slam_pretrain.model.kv_cache import decode_step

    return decode_step(model, cache, tokens)


def generate_ids(model: torch.nn.Module, ids: list[int], max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: Optional[int] = None,
                 use_cache: bool = True, notify: Optional[Notify] = _stderr) -> list[int]:
    """Continue the token list ``ids``; returns the new tokens only (stops early at ``eos_id``)."""
    return generate_batch(model, [ids], max_new_tokens, temperature, top_k, top_p, seed, eos_id,
                          use_cache, notify)[0]


def generate(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 64,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             use_cache: bool = True, notify: Optional[Notify] = _stderr) -> str:
    """The text the model writes after ``prompt`` (the continuation only; stops at EOS).

    The context starts with EOS: the packer ends every document with EOS, so in training a new
    document follows an EOS, and the prompt is the beginning of one. EOS decodes to nothing.
    """
    eos = getattr(tokenizer, "eos_id", None)
    eos = eos if isinstance(eos, int) and eos >= 0 else None
    ids = ([eos] if eos is not None else []) + list(tokenizer.encode(prompt))
    new = generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p, seed, eos_id=eos,
                       use_cache=use_cache, notify=notify)
    # Decode prompt and continuation together and cut the prompt's text off: a tokenizer may
    # render a piece differently at the start of a decode (e.g. SentencePiece's dummy prefix).
    full, head = tokenizer.decode(ids + new), tokenizer.decode(ids)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(new)


def generate_cli(args: argparse.Namespace) -> int:
    """``slam-pretrain generate``: prints the prompt followed by the continuation."""
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    model, tokenizer, meta = load_model(args.checkpoint, device=args.device)
    use_cache = not getattr(args, "no_cache", False)
    print(f"[generate] {meta['kind']} {meta['source']} (step {meta['step']}), temperature {args.temperature}"
          f"{'' if args.temperature else ' (greedy)'}, seed {args.seed}, "
          f"{'KV cache' if uses_cache(model, use_cache) else 'recompute'}", file=sys.stderr, flush=True)
    text = generate(model, tokenizer, args.input, args.max_new_tokens, args.temperature, args.top_k,
                    args.top_p, args.seed, use_cache=use_cache)
    print(args.input + text, flush=True)
    return 0
