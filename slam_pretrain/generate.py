"""Sampling text from a checkpoint or an export (``slam-pretrain generate``).

The model has no KV cache (the EF segments depend on the sequence length, which makes one
awkward), so every new token recomputes the forward pass over the context, cropped to the last
``model.max_seq_len`` tokens: O(new tokens x context) work, fine for the small models one samples
from on a laptop. Temperature 0 is greedy decoding (deterministic); otherwise sampling uses a
``torch.Generator`` seeded with ``seed``, so a seed reproduces its text on the same device.
Generation stops after ``max_new_tokens`` or at the first EOS.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

import torch

from slam_pretrain.errors import UserError
from slam_pretrain.export import load_model


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


@torch.no_grad()
def generate_ids(model: torch.nn.Module, ids: list[int], max_new_tokens: int, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: Optional[int] = None) -> list[int]:
    """Continue the token list ``ids``; returns the new tokens only (stops early at ``eos_id``)."""
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if not ids:
        raise UserError("the prompt encodes to no tokens and there is no EOS token to start from")
    device = next(model.parameters()).device
    generator = None
    if temperature > 0:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    max_len = model.config.max_seq_len
    was_training = model.training
    model.eval()
    context, new = list(ids), []
    try:
        for _ in range(max_new_tokens):
            window = torch.tensor([context[-max_len:]], dtype=torch.long, device=device)  # [1, n]
            logits = model(window)[0, -1]  # [V]
            tok = next_token(logits, temperature, top_k, top_p, generator)
            if eos_id is not None and tok == eos_id:
                break
            context.append(tok)
            new.append(tok)
    finally:
        model.train(was_training)
    return new


def generate(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 64,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> str:
    """The text the model writes after ``prompt`` (the continuation only; stops at EOS).

    The context starts with EOS: the packer ends every document with EOS, so in training a new
    document follows an EOS, and the prompt is the beginning of one. EOS decodes to nothing.
    """
    eos = getattr(tokenizer, "eos_id", None)
    eos = eos if isinstance(eos, int) and eos >= 0 else None
    ids = ([eos] if eos is not None else []) + list(tokenizer.encode(prompt))
    new = generate_ids(model, ids, max_new_tokens, temperature, top_k, top_p, seed, eos_id=eos)
    # Decode prompt and continuation together and cut the prompt's text off: a tokenizer may
    # render a piece differently at the start of a decode (e.g. SentencePiece's dummy prefix).
    full, head = tokenizer.decode(ids + new), tokenizer.decode(ids)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(new)


def generate_cli(args: argparse.Namespace) -> int:
    """``slam-pretrain generate``: prints the prompt followed by the continuation."""
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    model, tokenizer, meta = load_model(args.checkpoint, device=args.device)
    print(f"[generate] {meta['kind']} {meta['source']} (step {meta['step']}), temperature {args.temperature}"
          f"{'' if args.temperature else ' (greedy)'}, seed {args.seed}", file=sys.stderr, flush=True)
    text = generate(model, tokenizer, args.input, args.max_new_tokens, args.temperature, args.top_k,
                    args.top_p, args.seed)
    print(args.input + text, flush=True)
    return 0
