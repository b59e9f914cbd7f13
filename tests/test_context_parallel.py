"""Context parallelism (engine.context_parallel): every sequence split over K ranks.

1. The model: CP=2 on 2 gloo processes gives the unsharded model's loss and gradients (fp32,
   1e-5 relative) for RoPE and learned positions, GQA, pre/post-norm, overlap 0, chunks of one
   and of two EF segments, document masking with and without position reset.
2. Activation memory per rank at 2N with CP=2 is close to that at N without CP (measured exactly:
   the bytes autograd saves for backward); the CPU's mask-free offset-causal attention equals the
   masked one (outputs and gradients).
3. Through the real CLI (FSDP2): CP=2 (with activation checkpointing of every block) gives the
   per-step losses and gradient norms of CP=1 (1e-5), with document masking on; a run killed after a checkpoint and resumed is bitwise the straight
   CP run; a CP=2 checkpoint resumed without CP continues as the CP=1 run; a 2 x 2 (data x
   context) mesh matches 2 data ranks.
4. Mistakes are one line: DeepSpeed, compile, a length that does not split, a world that K does
   not divide.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed
from train_utils import base_overrides, latest_step, losses, run_and_kill, run_train

# (name, model overrides, sequence length): chunks of C = N / 4 tokens, stride T = S - O.
CASES = [
    ("rope-gqa", dict(segment_len=12, overlap=4, num_kv_heads=2), 64),  # C = 2T: two segments per chunk
    ("one-segment-chunks", dict(segment_len=12, overlap=4), 32),  # C = T
    ("doc-masking", dict(segment_len=12, overlap=4, doc_masking=True), 64),
    ("doc-position-reset", dict(segment_len=12, overlap=4, doc_masking=True, doc_position_reset=True,
                                pos_encoding="learned"), 64),
    ("learned-post-norm", dict(segment_len=10, overlap=2, pos_encoding="learned", norm_position="post"), 64),
    ("no-overlap", dict(segment_len=8, overlap=0), 64),  # no halo at all
]


def _tiny(**kw):
    from slam_pretrain.model import ModelConfig

    return ModelConfig(vocab_size=64, max_seq_len=512, d_model=32, num_heads=4, d_ff=64, ef_cycles=2, eos_id=3,
                       **kw)


def _batch(n: int, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 64, (2, n), generator=g)
    for row, cuts in ((0, (7, n // 2 - 1, n // 2 + 3)), (1, (19, n - 3))):  # documents crossing chunk edges
        tokens[row, list(cuts)] = 3
    targets = torch.randint(0, 64, (2, n), generator=g)
    targets[1, :5] = -100  # ignored targets count once, over the whole row
    return tokens, targets


def _compare_with_unsharded(info, cases):
    """On each rank: the CP=2 loss (mean over ranks) and gradients (mean over ranks, as FSDP
    reduces them) against the unsharded model's, as relative errors."""
    import torch.distributed as dist

    from slam_pretrain.engine.context_parallel import apply_context_parallel, build_mesh
    from slam_pretrain.model import SLAMv1LM

    mesh = build_mesh(info, 2)
    out = {}
    for name, kw, n in cases:
        ref = SLAMv1LM(_tiny(**kw))
        ref.init_weights(seed=1)
        model = SLAMv1LM(_tiny(**kw))
        model.load_state_dict(ref.state_dict())
        apply_context_parallel(model, mesh)
        tokens, targets = _batch(n)
        _, ref_loss = ref(tokens, targets)
        ref_loss.backward()
        logits, loss = model(tokens, targets)
        loss.backward()
        assert logits.shape == (2, n // 2, 64)  # this rank's half of the positions only
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        grad_err = 0.0
        for (pname, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
            g = q.grad.clone()
            dist.all_reduce(g)
            grad_err = max(grad_err, ((g / 2 - p.grad).norm() / p.grad.norm()).item())
        out[name] = {"loss_err": abs(mean_loss.item() / 2 - ref_loss.item()) / ref_loss.item(), "grad_err": grad_err}
    return out


def test_context_parallel_matches_the_unsharded_model():
    results = run_distributed(_compare_with_unsharded, world_size=2, args=(CASES,))
    for name, r in results[0].items():
        assert r["loss_err"] < 1e-5 and r["grad_err"] < 1e-5, (name, r)
    assert results[0] == results[1]  # both ranks agree on the reduced figures


@pytest.mark.parametrize("a,c,heads,kv_heads", [(0, 16, 4, 4), (16, 16, 4, 2), (48, 16, 4, 1), (40, 24, 2, 2)])
def test_offset_causal_attention_equals_the_masked_one(a, c, heads, kv_heads):
    """The CPU path of a chunk's attention (prefix + causal square, merged by log-sum-exp) against
    SDPA with the boolean lower-right mask: outputs and all three gradients."""
    import torch.nn.functional as F

    from slam_pretrain.model.sequence_shard import OffsetCausalAttention

    g = torch.Generator().manual_seed(a + c)
    q = torch.randn(2, heads, c, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, a + c, 8, generator=g, requires_grad=True) for _ in range(2))
    grad = torch.randn(2, heads, c, 8, generator=g)
    out = OffsetCausalAttention.apply(q, k, v, a)
    got = torch.autograd.grad(out, (q, k, v), grad)
    mask = torch.ones(c, a + c, dtype=torch.bool).tril(diagonal=a)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=heads != kv_heads)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def _activation_bytes(info, n):
    from slam_pretrain.engine.activation_checkpointing import saved_activation_bytes
    from slam_pretrain.engine.context_parallel import apply_context_parallel, build_mesh
    from slam_pretrain.model import SLAMv1LM

    kw = dict(segment_len=48, overlap=16, num_kv_heads=2)
    cfg = _tiny(**kw)
    cfg.d_model, cfg.d_ff, cfg.max_seq_len = 64, 192, 2 * n
    tokens, targets = _batch(2 * n)
    whole = SLAMv1LM(cfg)
    (_, loss), at_n = saved_activation_bytes(lambda: whole(tokens[:, :n], targets[:, :n]), whole)
    sharded = SLAMv1LM(cfg)
    apply_context_parallel(sharded, build_mesh(info, 2))
    (_, loss2), at_2n_cp2 = saved_activation_bytes(lambda: sharded(tokens, targets), sharded)
    loss2.backward()  # the collectives of backward run on both ranks
    return {"n": at_n, "2n_cp2": at_2n_cp2}


def test_activation_memory_at_2n_with_cp2_is_close_to_n_without():
    n = 512
    results = run_distributed(_activation_bytes, world_size=2, args=(n,))
    for r in results:
        ratio = r["2n_cp2"] / r["n"]
        print(f"saved activations: N={n} unsharded {r['n'] / 2**20:.2f} MiB, 2N with CP=2 "
              f"{r['2n_cp2'] / 2**20:.2f} MiB per rank, ratio {ratio:.3f}")
        # The same tokens per rank; what CP adds is the gathered keys/values of the full blocks and
        # the halos (no [C, b] mask is saved: OffsetCausalAttention).
        assert 0.95 < ratio < 1.1, r


# -- through the CLI ---------------------------------------------------------------------------

SEGMENTS = ["model.segment_len=24", "model.overlap=8"]  # T = 16: 128-token rows cut into 4 chunks of 2T


def _args(manifest: Path, out: Path, cp: int, extra=(), **kw) -> list[str]:
    args = base_overrides(manifest, out, engine="fsdp", zero=0, **kw)
    # Under CP the blocks are checkpointed (recomputed in backward, collectives included); CP=1 is not.
    ac = "engine.activation_checkpointing=" + ("all" if cp > 1 else "none")
    for s in [*SEGMENTS, f"engine.context_parallel={cp}", "model.doc_masking=true", ac, *extra]:
        args += ["--set", s]
    return args


def _ok(r) -> None:
    assert r.returncode == 0, f"exit {r.returncode}\n--- stdout\n{r.stdout[-4000:]}\n--- stderr\n{r.stderr[-6000:]}"


def _records(out: Path) -> dict[int, dict]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if "event" not in r and r.get("split") != "val"}


def _close(a: dict[int, dict], b: dict[int, dict]) -> None:
    assert sorted(a) == sorted(b)
    for step in a:
        for key in ("loss", "grad_norm"):
            x, y = a[step][key], b[step][key]
            assert math.isfinite(x) and abs(x - y) <= 1e-5 * abs(y), (step, key, x, y)


def test_cli_context_parallel_matches_one_process_and_resumes_exactly(tmp_path, tiny_manifest):
    steps, k = 6, 3
    kw = dict(steps=steps, interval=k, micro=4, global_batch=8)  # grad accumulation 2 in both
    one = tmp_path / "cp1"
    _ok(run_train(1, _args(tiny_manifest, one, 1, **kw)))
    straight = tmp_path / "cp2"
    r = run_train(2, _args(tiny_manifest, straight, 2, **kw))
    _ok(r)
    assert "world 2 (data 1 x context 2)" in r.stdout
    _close(_records(straight), _records(one))

    killed = tmp_path / "cp2_killed"
    args = _args(tiny_manifest, killed, 2, **kw)
    rc, log = run_and_kill(2, args, killed, when=lambda d: latest_step(d) == k)
    assert rc == -9, f"the run was not killed mid-way (exit {rc}):\n{log[-3000:]}"
    r = run_train(2, args)  # --resume auto
    _ok(r)
    assert f"resumed from step {k} (" in r.stdout
    assert losses(killed) == losses(straight)  # bitwise
    engine_json = json.loads((killed / "checkpoints" / f"step_{steps:08d}" / "engine.json").read_text())
    assert engine_json["context_parallel"] == 2

    # Another K: the CP=2 checkpoint at step k, resumed by one process without CP, continues as CP=1 did.
    other = tmp_path / "cp2_to_cp1"
    r = run_train(1, _args(tiny_manifest, other, 1, **kw), resume=str(straight / "checkpoints" / f"step_{k:08d}"))
    _ok(r)
    assert f"resumed from step {k} (" in r.stdout
    after, want = _records(other), _records(one)
    _close({s: after[s] for s in range(k + 1, steps + 1)}, {s: want[s] for s in range(k + 1, steps + 1)})


def test_cli_data_by_context_mesh_matches_data_parallel(tmp_path, tiny_manifest):
    """4 processes as 2 data ranks x 2 context ranks against 2 data ranks without CP."""
    kw = dict(steps=3, interval=3, micro=2, global_batch=8)
    dp = tmp_path / "dp2"
    _ok(run_train(2, _args(tiny_manifest, dp, 1, **kw)))
    mesh = tmp_path / "dp2_cp2"
    r = run_train(4, _args(tiny_manifest, mesh, 2, **kw), timeout=400)
    _ok(r)
    assert "world 4 (data 2 x context 2)" in r.stdout
    _close(_records(mesh), _records(dp))


@pytest.mark.parametrize("extra,needle", [
    (["engine.name=deepspeed"], "context parallelism runs on engine.name='fsdp'"),
    (["engine.compile=true"], "engine.compile=true is invalid with engine.context_parallel=2"),
    (["model.segment_len=48", "model.overlap=8"], "data.seq_len: sequence length 128 does not split over "
                                                  "context_parallel=2"),
    ([], "engine.context_parallel=2 is invalid for 1 process(es)"),
])
def test_context_parallel_mistakes_are_one_line(tmp_path, tiny_manifest, extra, needle):
    r = run_train(1, _args(tiny_manifest, tmp_path / "bad", 2, extra=extra, steps=1))
    assert r.returncode == 2, r.stdout + r.stderr
    assert needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
