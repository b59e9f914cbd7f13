"""Passkey retrieval for ``slam-pretrain eval-long``: does the model find a key anywhere in its context?

Synthetic prompts: EOS, an instruction, filler text with
"The pass key is NNNNN. Remember it. NNNNN is the pass key." placed at depth d (0 = right after
the instruction, 1 = right before the question), then "What is the pass key? The pass key is".
A length L means the prompt and the room for the answer fill exactly L tokens, so L can be at
most ``model.max_seq_len``. Scored by greedy generation with the KV cache (correct when the first
number in the continuation is the key) or by log-likelihood (correct when the right key's
continuation scores higher than every one of ``candidates - 1`` distractor keys). The same keys
are used in every (L, d) cell, so cells differ only by length and depth. torch and generate.py are
imported where used.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from slam_pretrain.errors import UserError

if TYPE_CHECKING:
    import torch

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and remember it. I will ask you about it.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key? The pass key is"
ANSWER = " {key}"


@dataclass(frozen=True)
class PasskeyTrial:
    length: int  # prompt + answer room, in tokens
    depth: float  # where the needle sits in the filler, 0..1
    trial: int  # index into the keys: the same key in every (length, depth) cell
    key: str
    ids: list[int]  # the prompt (EOS, instruction, filler + needle, question)
    room: int  # tokens generated (the longest answer's tokens + 1, to see where the number ends)
    needle_at: int  # index in ids of the needle's first token


def make_keys(trials: int, seed: int) -> list[str]:
    """``trials`` distinct five-digit keys, seeded."""
    rng, keys = random.Random(seed), []
    while len(keys) < trials:
        k = str(rng.randint(10000, 99999))
        if k not in keys:
            keys.append(k)
    return keys


def answer_room(tokenizer: Any, keys: list[str]) -> int:
    return max(len(tokenizer.encode(ANSWER.format(key=k))) for k in keys) + 1


def min_passkey_length(tokenizer: Any, keys: list[str]) -> int:
    """The shortest L that fits a prompt without filler and the answer room."""
    fixed = 1 + len(tokenizer.encode(INTRO)) + len(tokenizer.encode(QUESTION))
    return fixed + max(len(tokenizer.encode(NEEDLE.format(key=k))) for k in keys) + answer_room(tokenizer, keys)


def check_lengths(lengths: list[int], max_seq_len: int, shortest: int) -> None:
    """UserError naming ``--lengths`` for a length beyond the model's window or below the prompt's minimum."""
    for n in lengths:
        if n > max_seq_len:
            raise UserError(f"--lengths {n} is longer than model.max_seq_len={max_seq_len} (the model cannot "
                            f"attend that far): use lengths between {shortest} and {max_seq_len}")
        if n < shortest:
            raise UserError(f"--lengths {n} is too short: a passkey prompt and its answer need at least "
                            f"{shortest} tokens with this tokenizer; use lengths between {shortest} and {max_seq_len}")


def default_lengths(max_seq_len: int, shortest: int) -> list[int]:
    """Powers of two from the first that fits a prompt up to max_seq_len, and max_seq_len itself."""
    out, n = [], 1 << max(shortest - 1, 1).bit_length()
    while n < max_seq_len:
        out.append(n)
        n *= 2
    return out + [max_seq_len] if max_seq_len >= shortest else []


def passkey_trials(tokenizer: Any, lengths: list[int], depths: list[float], keys: list[str]) -> list[PasskeyTrial]:
    """One prompt per (length, depth, key), in that order. The prompt has ``length - room`` tokens:
    the filler (FILLER repeated, cut to the token) takes what the fixed parts leave."""
    room = answer_room(tokenizer, keys)
    intro, question, filler_unit = (tokenizer.encode(s) for s in (INTRO, QUESTION, FILLER))
    out = []
    for length in lengths:
        for depth in depths:
            for t, key in enumerate(keys):
                needle = tokenizer.encode(NEEDLE.format(key=key))
                n_fill = length - room - (1 + len(intro) + len(needle) + len(question))
                if n_fill < 0:
                    raise UserError(f"--lengths {length} is too short for the passkey prompt "
                                    f"({-n_fill} tokens missing)")
                filler = (filler_unit * (n_fill // len(filler_unit) + 1))[:n_fill]
                before = int(round(depth * n_fill))
                ids = [tokenizer.eos_id] + intro + filler[:before] + needle + filler[before:] + question
                out.append(PasskeyTrial(length, depth, t, key, ids, room, 1 + len(intro) + before))
    return out


def first_number(text: str) -> Optional[str]:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def score_by_generation(model: "torch.nn.Module", tokenizer: Any, trials: list[PasskeyTrial],
                        batch_size: int) -> list[dict[str, Any]]:
    """Greedy continuations (KV cache; recompute for fractional layouts) of ``room`` tokens; a trial
    is correct when the first number in its continuation is the key."""
    from slam_pretrain.downstream.generate import generate_batch

    records = []
    for start in range(0, len(trials), batch_size):
        chunk = trials[start:start + batch_size]
        new = generate_batch(model, [t.ids for t in chunk], chunk[0].room, temperature=0.0,
                             eos_id=tokenizer.eos_id, notify=None)
        for t, ids in zip(chunk, new):
            text = tokenizer.decode(ids)
            records.append({"length": t.length, "depth": t.depth, "trial": t.trial, "key": t.key,
                            "needle_at": t.needle_at, "output_ids": list(ids), "output": text,
                            "correct": first_number(text) == t.key})
    return records


def distractors(keys: list[str], candidates: int, seed: int) -> list[list[str]]:
    """For each key, ``candidates - 1`` other distinct five-digit keys (seeded, the same in every cell)."""
    rng, out = random.Random(seed + 1), []
    for key in keys:
        others: list[str] = []
        while len(others) < candidates - 1:
            k = str(rng.randint(10000, 99999))
            if k != key and k not in others:
                others.append(k)
        out.append(others)
    return out


def score_by_loglik(model: "torch.nn.Module", tokenizer: Any, trials: list[PasskeyTrial], candidates: int,
                    seed: int, batch_size: int) -> list[dict[str, Any]]:
    """Sum of the log-probabilities of ``" " + key`` after the prompt, for the right key and the
    distractors; correct when the right key scores strictly highest."""
    import torch
    import torch.nn.functional as F

    by_trial = {t.trial: t.key for t in trials}
    keys = [by_trial[i] for i in sorted(by_trial)]
    others = dict(zip(keys, distractors(keys, candidates, seed)))
    device = next(model.parameters()).device
    # The rows share each prompt's list (no copies: many long prompts times the candidates).
    rows = [(i, cand, t.ids, tokenizer.encode(ANSWER.format(key=cand)))
            for i, t in enumerate(trials) for cand in [t.key] + others[t.key]]
    # Right padding never changes a prefix-consistent model's logits; a fractional layout moves
    # with the length, so it scores one row at a time.
    step = batch_size if model.config.prefix_consistent else 1
    scores: list[dict[str, float]] = [{} for _ in trials]
    with torch.no_grad():
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            inputs = [ids + ans[:-1] for _, _, ids, ans in chunk]
            width = max(len(x) for x in inputs)
            x = torch.tensor([r + [0] * (width - len(r)) for r in inputs], device=device)
            h = model.features(x)  # the LM head runs on the answer positions only, not [b, width, V]
            for r, (i, cand, ids, ans) in enumerate(chunk):
                pos = torch.arange(len(ids) - 1, len(ids) - 1 + len(ans), device=device)
                logp = F.log_softmax(model.lm_head(h[r, pos]).float(), dim=-1)  # [len(ans), V]
                scores[i][cand] = float(logp[torch.arange(len(ans), device=device),
                                             torch.tensor(ans, device=device)].sum())
    records = []
    for t, sc in zip(trials, scores):
        best_other = max((v for k, v in sc.items() if k != t.key), default=-math.inf)
        records.append({"length": t.length, "depth": t.depth, "trial": t.trial, "key": t.key,
                        "needle_at": t.needle_at, "scores": sc, "chosen": max(sc, key=sc.get),
                        "correct": sc[t.key] > best_other})
    return records


def accuracy_cells(records: list[dict[str, Any]], lengths: list[int], depths: list[float]) -> list[dict[str, Any]]:
    """One cell per (length, depth): correct trials, trials and their ratio."""
    cells = []
    for n in lengths:
        for d in depths:
            hits = [r["correct"] for r in records if r["length"] == n and r["depth"] == d]
            cells.append({"length": n, "depth": d, "correct": sum(hits), "trials": len(hits),
                          "accuracy": sum(hits) / len(hits) if hits else None})
    return cells
