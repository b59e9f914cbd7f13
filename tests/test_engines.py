"""Engines (DeepSpeed ZeRO 0-3, FSDP2) on CPU with gloo, 1 and 2 processes, fp32, the real SLAMv1LM.

Process spawns are the cost here, so each spawned run checks every engine variant and several
things per variant; the tests below only assert on what those runs recorded:

  A  2 ranks: train K steps (grad_accum 2), save, continue M steps (the uninterrupted run); live
     weights == consolidated_state_dict(saved); a NaN injected on rank 1 is skipped on every rank
     with weights unchanged, then two more steps; activation checkpointing none / ef_cycles / all
     give identical losses and gradients; an engine built from a model factory (meta device /
     zero.Init) starts from the same weights as one around an eagerly built model and trains
     bitwise alike.
  C  1 rank: the same as A at world size 1 (grad_accum 4, same global batch), the factory check
     too, and the elastic load of A's 2-rank checkpoint (DCP resharding / DeepSpeed universal
     checkpoint).
  B  2 ranks, a fresh process group: load A's checkpoint, run M + 2 steps: bitwise A's losses
     (so the skipped step changed neither weights nor optimizer state); the elastic load of C's
     1-rank FSDP checkpoint (unsharded at world 1) into 2 ranks; and, first, a ZeRO-3 factory
     build in fresh processes (zero.Init before any other DeepSpeed call).
  D  1 rank, fresh process: load C's checkpoint, bitwise C's continuation.

Plus, in a subprocess of 2 ranks: the peak host RSS of building a ~300M-parameter model through
the FSDP engine's factory path.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_utils import run_distributed
from slam_pretrain.config import Config
from slam_pretrain.engine import build_engine, consolidated_state_dict, grad_accum_steps
from slam_pretrain.errors import ConfigError
from slam_pretrain.model import ModelConfig, SLAMv1LM, count_params

VARIANTS = {"ds0": ("deepspeed", 0), "ds1": ("deepspeed", 1), "ds2": ("deepspeed", 2),
            "ds3": ("deepspeed", 3), "fsdp": ("fsdp", 1)}
MICRO, GLOBAL, SEQ = 2, 8, 64  # world 2 -> grad_accum 2; world 1 -> grad_accum 4
K, M = 3, 3  # steps before the checkpoint, steps after it
LR = 3e-3


def tiny_model_config() -> ModelConfig:
    return ModelConfig(vocab_size=2048, max_seq_len=SEQ, d_model=64, num_heads=4, num_kv_heads=2, d_ff=128,
                       ef_cycles=2, segment_len=48, overlap=8)


def make_config(variant: str, out_dir: Path, ac: str = "none", global_batch: int = GLOBAL) -> Config:
    name, stage = VARIANTS[variant]
    cfg = Config()
    cfg.model = tiny_model_config()
    cfg.data.seq_len = SEQ
    t = cfg.train
    t.micro_batch_size, t.global_batch_size, t.lr, t.grad_clip, t.weight_decay = MICRO, global_batch, LR, 1.0, 0.1
    e = cfg.engine
    e.name, e.zero_stage, e.precision, e.device, e.activation_checkpointing = name, stage, "fp32", "cpu", ac
    cfg.run.out_dir = str(out_dir)
    return cfg


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed global batch: GLOBAL sequences (inputs, labels), the same every step."""
    g = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, 2048, (GLOBAL, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def micro_batch(rank: int, micro: int, grad_accum: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = data()
    start = (rank * grad_accum + micro) * MICRO  # ranks x micro-batches tile the global batch
    return x[start:start + MICRO], y[start:start + MICRO]


def new_engine(cfg: Config, info: Any, seed: int = 0):
    torch.manual_seed(seed)  # identical initial weights on every rank
    return build_engine(cfg, SLAMv1LM(cfg.model), info)


def run_steps(engine: Any, info: Any, n: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(n):
        losses = [engine.forward_backward(*micro_batch(info.rank, m, engine.grad_accum))
                  for m in range(engine.grad_accum)]
        res = engine.optimizer_step(LR)
        local = torch.stack(losses).mean()
        glob = local.clone().double()
        torch.distributed.all_reduce(glob)
        out.append({"loss": local.item(), "global_loss": glob.item() / info.world_size,
                    "grad_norm": res.grad_norm, "skipped": res.skipped})
    return out


def _nan_on_rank1(module: Any, args: Any, output: torch.Tensor) -> torch.Tensor:
    return output * float("nan")


def engine_grads(engine: Any) -> dict[str, torch.Tensor]:
    """Full gradients after backward (a collective)."""
    out = {}
    if engine.name == "deepspeed":
        from deepspeed.utils import safe_get_full_grad

        for name, p in engine.model.named_parameters():
            g = safe_get_full_grad(p)
            out[name] = (g if g is not None else p.grad).detach().float().cpu().clone()
    else:  # FSDP2: DTensor gradients, or plain ones at world 1 in fp32 (not sharded)
        for name, p in engine.model.named_parameters():
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            out[name] = g.detach().float().cpu().clone()
    return out


def check_factory_build(info: Any, v: str, out: Path) -> dict[str, Any]:
    """An engine built from a factory (meta device, or zero.Init for ZeRO-3) with run.seed = s
    against one around SLAMv1LM built eagerly after torch.manual_seed(s): same weights, then the
    same two training steps (which also catches a tied LM head that did not stay tied)."""
    res: dict[str, Any] = {}
    for how in ("eager", "factory"):
        cfg = make_config(v, out / f"build_{how}")
        cfg.run.seed = 77
        torch.manual_seed(cfg.run.seed if how == "eager" else 5)  # the factory path must not read it
        engine = build_engine(cfg, SLAMv1LM(cfg.model) if how == "eager" else (lambda: SLAMv1LM(cfg.model)), info)
        res[how] = {"weights": engine.full_state_dict(), "steps": run_steps(engine, info, 2),
                    "num_params": engine.num_params}
        del engine
    a, b = res["eager"], res["factory"]
    return {"same_keys": set(a["weights"]) == set(b["weights"]),
            "same_weights": all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"]),
            "same_steps": [(s["loss"], s["grad_norm"]) for s in a["steps"]]
            == [(s["loss"], s["grad_norm"]) for s in b["steps"]],
            "num_params": (a["num_params"], b["num_params"]),
            # a fingerprint of the initial weights, compared across world sizes by the test
            "weights_digest": float(sum(w.double().sum() for w in b["weights"].values()))}


def phase_train(info: Any, root: str, variants: list[str], with_ac: bool) -> dict[str, Any]:
    """A (2 ranks) / first half of C (1 rank)."""
    results: dict[str, Any] = {}
    for v in variants:
        r: dict[str, Any] = {}
        out = Path(root) / f"w{info.world_size}" / v
        r["factory"] = check_factory_build(info, v, out)
        engine = new_engine(make_config(v, out), info)
        r["grad_accum"] = engine.grad_accum
        r["before"] = run_steps(engine, info, K)
        engine.save(out / "engine")
        live = engine.full_state_dict()
        r["live_at_save"] = live if info.rank == 0 else None
        if info.rank == 0:
            saved = consolidated_state_dict(out / "engine", engine.meta())
            r["consolidated"] = saved
        r["after"] = run_steps(engine, info, M)
        # A non-finite loss on the last rank only: every rank must skip, weights must not move.
        before_bad = engine.full_state_dict()
        handle = engine.model.norm_f.register_forward_hook(_nan_on_rank1) \
            if info.rank == info.world_size - 1 else None
        r["bad"] = run_steps(engine, info, 1)[0]
        if handle is not None:
            handle.remove()
        after_bad = engine.full_state_dict()
        r["bad_weights_unchanged"] = all(torch.equal(before_bad[k], after_bad[k]) for k in before_bad)
        r["post_bad"] = run_steps(engine, info, 2)
        del engine
        if with_ac:
            r["ac"] = check_activation_checkpointing(info, v, out)
            if v in ("ds1", "ds2"):
                r["own_skip"] = check_skip_without_deepspeed_check(info, v, out)
        results[v] = r
    return results


def check_activation_checkpointing(info: Any, v: str, out: Path) -> dict[str, Any]:
    ref = None
    res: dict[str, Any] = {}
    for ac in ("none", "ef_cycles", "all"):
        cfg = make_config(v, out / f"ac_{ac}", ac=ac, global_batch=MICRO * info.world_size)
        engine = new_engine(cfg, info)
        loss = engine.forward_backward(*micro_batch(info.rank, 0, 1))
        grads = engine_grads(engine)
        engine.optimizer_step(LR)
        if ref is None:
            ref = (loss, grads)
        else:
            res[ac] = {"loss_equal": torch.equal(loss, ref[0]),
                       "grads_equal": all(torch.equal(grads[k], ref[1][k]) for k in grads),
                       "grads_nonzero": all(g.abs().sum() > 0 for g in grads.values())}
        del engine
    return res


def check_skip_without_deepspeed_check(info: Any, v: str, out: Path) -> dict[str, Any]:
    """ZeRO 1/2 with DeepSpeed's own norm/overflow check off: the engine's guard alone must skip."""
    cfg = make_config(v, out / "own_skip")
    cfg.train.grad_clip = 0.0
    cfg.engine.deepspeed_extra = {"zero_optimization": {"compute_grad_norm": False}}
    engine = new_engine(cfg, info)
    run_steps(engine, info, 1)
    before = engine.full_state_dict()
    handle = engine.model.norm_f.register_forward_hook(_nan_on_rank1) if info.rank == info.world_size - 1 else None
    bad = run_steps(engine, info, 1)[0]
    if handle is not None:
        handle.remove()
    after = engine.full_state_dict()
    ok = run_steps(engine, info, 1)[0]
    del engine
    return {"skipped": bad["skipped"], "unchanged": all(torch.equal(before[k], after[k]) for k in before),
            "next_ok": not ok["skipped"] and math.isfinite(ok["loss"])}


def phase_resume(info: Any, root: str, variants: list[str]) -> dict[str, Any]:
    """B (2 ranks) / D (1 rank): a fresh engine with other initial weights loads the checkpoint."""
    results = {}
    for v in variants:
        out = Path(root) / f"w{info.world_size}" / v
        engine = new_engine(make_config(v, out), info, seed=99)
        engine.load(out / "engine")
        results[v] = {"after": run_steps(engine, info, M), "post_bad": run_steps(engine, info, 2)}
        del engine
    return results


def phase_two_ranks_again(info: Any, root: str, variants: list[str]) -> dict[str, Any]:
    """B: resume A's checkpoints; then FSDP's 1-rank checkpoint (plain tensors: one process in fp32
    is not sharded) loaded into 2 ranks. First of all, in these fresh processes, a ZeRO-3 engine
    from a factory: zero.Init then runs before anything has set up DeepSpeed's communication."""
    cfg = make_config("ds3", Path(root) / "first_ds3")
    cfg.run.seed = 77  # as in check_factory_build
    engine = build_engine(cfg, lambda: SLAMv1LM(cfg.model), info)
    first_ds3 = float(sum(w.double().sum() for w in engine.full_state_dict().values()))
    del engine
    engine = new_engine(make_config("fsdp", Path(root) / "elastic_up"), info, seed=99)
    engine.load(Path(root) / "w1" / "fsdp" / "engine")
    elastic_up = {"weights": engine.full_state_dict(), "after": run_steps(engine, info, M)}
    del engine
    return {"resume": phase_resume(info, root, variants), "elastic_up": elastic_up, "first_ds3": first_ds3}


def phase_elastic(info: Any, root: str, variants: list[str]) -> dict[str, Any]:
    """Second half of C: 1 rank loads the 2-rank checkpoint and continues."""
    results = {}
    for v in variants:
        src = Path(root) / "w2" / v / "engine"
        engine = new_engine(make_config(v, Path(root) / "elastic" / v), info, seed=99)
        engine.load(src)
        results[v] = {"weights": engine.full_state_dict(), "after": run_steps(engine, info, M),
                      "grad_accum": engine.grad_accum}
        del engine
    return results


def phase_one_rank(info: Any, root: str, variants: list[str]) -> dict[str, Any]:
    return {"train": phase_train(info, root, variants, with_ac=False), "elastic": phase_elastic(info, root, variants),
            "sharded": new_engine(make_config("fsdp", Path(root) / "probe"), info).sharded}


# ---------------------------------------------------------------------------------------------
# The spawned runs (once per module) and the assertions.

ALL = list(VARIANTS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = str(tmp_path_factory.mktemp("engines"))
    out: dict[str, Any] = {"root": root}
    out["A"] = run_distributed(phase_train, 2, args=(root, ALL, True), timeout=600)
    out["C"] = run_distributed(phase_one_rank, 1, args=(root, ALL), timeout=600)
    b = run_distributed(phase_two_ranks_again, 2, args=(root, ALL), timeout=300)
    out["B"] = [r["resume"] for r in b]
    out["elastic_up"] = [r["elastic_up"] for r in b]
    out["first_ds3"] = [r["first_ds3"] for r in b]
    out["D"] = run_distributed(phase_resume, 1, args=(root, ALL), timeout=300)
    return out


def _losses(steps: list[dict[str, Any]], key: str = "loss") -> list[float]:
    return [s[key] for s in steps]


@pytest.mark.parametrize("variant", ALL)
def test_loss_falls_and_grad_accum(runs: dict[str, Any], variant: str) -> None:
    for ranks, world, ga in ((runs["A"], 2, 2), ([runs["C"][0]["train"]], 1, 4)):
        for r in ranks:
            res = r[variant]
            assert res["grad_accum"] == ga
            losses = _losses(res["before"] + res["after"], "global_loss")
            assert all(math.isfinite(x) for x in losses)
            assert losses[-1] < losses[0] - 0.2, f"world {world}: loss did not fall: {losses}"
            assert not any(s["skipped"] for s in res["before"] + res["after"])
            assert all(math.isfinite(s["grad_norm"]) and s["grad_norm"] > 0 for s in res["before"])


@pytest.mark.parametrize("variant", ALL)
@pytest.mark.parametrize("world", [1, 2])
def test_exact_resume_is_bitwise(runs: dict[str, Any], variant: str, world: int) -> None:
    first = runs["A"] if world == 2 else [runs["C"][0]["train"]]
    resumed = runs["B"] if world == 2 else runs["D"]
    for rank, (a, b) in enumerate(zip(first, resumed)):
        a, b = a[variant], b[variant]
        assert _losses(b["after"]) == _losses(a["after"]), f"rank {rank}"
        assert [s["grad_norm"] for s in b["after"]] == [s["grad_norm"] for s in a["after"]]
        # The run that skipped a NaN step in between continues exactly like the one that did not.
        assert _losses(b["post_bad"]) == _losses(a["post_bad"]), f"rank {rank}: the skipped step changed state"


@pytest.mark.parametrize("variant", ALL)
@pytest.mark.parametrize("world", [1, 2])
def test_nonfinite_step_skipped_on_every_rank(runs: dict[str, Any], variant: str, world: int) -> None:
    ranks = runs["A"] if world == 2 else [runs["C"][0]["train"]]
    for rank, r in enumerate(ranks):
        res = r[variant]
        assert res["bad"]["skipped"] is True, f"rank {rank} did not skip"
        assert res["bad_weights_unchanged"], f"rank {rank}: weights moved on a skipped step"
        assert not any(s["skipped"] for s in res["post_bad"])
        if world == 2 and variant in ("ds1", "ds2"):  # DeepSpeed's own check disabled: our guard alone
            assert res["own_skip"] == {"skipped": True, "unchanged": True, "next_ok": True}, f"rank {rank}"


@pytest.mark.parametrize("variant", ALL)
@pytest.mark.parametrize("world", [1, 2])
def test_consolidated_state_dict_equals_live_weights(runs: dict[str, Any], variant: str, world: int) -> None:
    res = runs["A"][0][variant] if world == 2 else runs["C"][0]["train"][variant]
    live, saved = res["live_at_save"], res["consolidated"]
    expected = SLAMv1LM(tiny_model_config()).state_dict()
    assert set(saved) == set(expected)
    assert set(live) == set(expected)
    for k in expected:
        assert saved[k].dtype == torch.float32 and saved[k].shape == expected[k].shape, k
        assert torch.equal(saved[k], live[k]), k


@pytest.mark.parametrize("variant", ALL)
def test_elastic_two_ranks_to_one(runs: dict[str, Any], variant: str) -> None:
    el = runs["C"][0]["elastic"][variant]
    a0 = runs["A"][0][variant]
    assert el["grad_accum"] == 4
    for k, v in a0["consolidated"].items():
        assert torch.equal(el["weights"][k], v), f"{k} differs after the elastic load"
    # Same global batch, same optimizer state: the continuation matches the 2-rank run closely.
    want = _losses(a0["after"], "global_loss")
    got = _losses(el["after"], "global_loss")
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_elastic_one_rank_to_two_fsdp(runs: dict[str, Any]) -> None:
    """World 1 in fp32 keeps FSDP's parameters plain (no sharding hooks); its DCP checkpoint still
    reshards onto 2 ranks and the run continues like the 1-rank one."""
    assert runs["C"][0]["sharded"] is False
    c = runs["C"][0]["train"]["fsdp"]
    for rank, up in enumerate(runs["elastic_up"]):
        for k, w in c["consolidated"].items():
            assert torch.equal(up["weights"][k], w), f"rank {rank}: {k} differs after the elastic load"
        assert _losses(up["after"], "global_loss") == pytest.approx(_losses(c["after"], "global_loss"),
                                                                    rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("variant", ALL)
def test_factory_build_equals_eager_build(runs: dict[str, Any], variant: str) -> None:
    """Meta-device construction (FSDP2, DeepSpeed ZeRO 0-2) and zero.Init (ZeRO-3): the same
    run.seed gives the same weights as the eager build, at world 1 and 2, and the same training."""
    digests = []
    for world, ranks in ((2, runs["A"]), (1, [runs["C"][0]["train"]])):
        for rank, r in enumerate(ranks):
            f = r[variant]["factory"]
            assert f["same_keys"] and f["same_weights"], f"world {world} rank {rank}: initial weights differ"
            assert f["same_steps"], f"world {world} rank {rank}: training differs after a factory build"
            assert f["num_params"][0] == f["num_params"][1] == count_params(tiny_model_config())
            digests.append(f["weights_digest"])
    assert len(set(digests)) == 1, f"initial weights depend on the world size: {digests}"
    if variant == "ds3":  # also when zero.Init is the first DeepSpeed call of the process
        assert runs["first_ds3"] == [digests[0]] * 2


@pytest.mark.parametrize("variant", ALL)
def test_activation_checkpointing_identical(runs: dict[str, Any], variant: str) -> None:
    for rank, r in enumerate(runs["A"]):
        ac = r[variant]["ac"]
        for mode in ("ef_cycles", "all"):
            assert ac[mode]["loss_equal"], f"rank {rank} {mode}: loss differs"
            assert ac[mode]["grads_equal"], f"rank {rank} {mode}: gradients differ"
            assert ac[mode]["grads_nonzero"]


# ---------------------------------------------------------------------------------------------
# Host memory of building a large model through the factory path.

# ~315M parameters (22 blocks of d_model 1024, vocab 32000): 1.26 GB in fp32.
BIG = dict(vocab_size=32000, max_seq_len=256, d_model=1024, num_heads=16, d_ff=2816, ef_cycles=10, segment_len=128,
           overlap=32)


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def build_big_fsdp(info: Any, root: str) -> dict[str, Any]:
    """Build the BIG model through build_engine's factory path (FSDP2, fp32) and report the peak
    RSS this process reached while building, above its RSS just before."""
    import gc
    import resource

    # The same path once on the tiny model first: one-time costs (lazy imports, FSDP/DTensor setup,
    # ~80 MB) are not what is measured here.
    warm = make_config("fsdp", Path(root) / "tiny", global_batch=MICRO * info.world_size)
    warm_engine = build_engine(warm, lambda: SLAMv1LM(warm.model), info)
    del warm_engine
    cfg = make_config("fsdp", Path(root) / "big")
    cfg.model = ModelConfig(**BIG)
    cfg.data.seq_len = 256
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 1, info.world_size
    gc.collect()
    before = _rss_kb()
    with open("/proc/self/clear_refs", "w") as f:  # high-water mark := current RSS (Linux >= 4.0)
        f.write("5")
    engine = build_engine(cfg, lambda: SLAMv1LM(cfg.model), info)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in engine.model.parameters())
    # Two values of this rank's shard against the unsharded definition (initial_values).
    p = engine.model.get_parameter("final_block.ffn.down.weight")
    shard = p.to_local()
    rows = shard.shape[0]
    offset = info.rank * -(-p.shape[0] // info.world_size) * p.shape[1]
    expect = engine.model.initial_values("final_block.ffn.down.weight", offset, offset + rows * p.shape[1], cfg.run.seed)
    return {"before_kb": before, "peak_kb": peak, "local_params": local, "num_params": engine.num_params,
            "shard_matches": torch.equal(shard.reshape(-1), expect), "sharded": engine.sharded}


def test_factory_build_host_memory_stays_under_the_model_size() -> None:
    """2 ranks build a 315M-parameter (1.26 GB fp32) model through FSDP2's meta-device path: each
    rank's host RSS grows by its half of the weights plus a few MB of initialisation blocks, never
    by the whole model (an eager build first holds all 1.26 GB on every rank). Two ranks because at
    world size 1 on a CPU the rank's shard is the whole model."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="slam_big_") as root:
        results = run_distributed(build_big_fsdp, 2, args=(root,), timeout=600)
    fp32_bytes = count_params(ModelConfig(**BIG)) * 4
    for rank, r in enumerate(results):
        assert r["sharded"] and r["num_params"] == count_params(ModelConfig(**BIG))
        assert r["local_params"] * 4 == pytest.approx(fp32_bytes / 2, rel=0.02), rank
        assert r["shard_matches"], f"rank {rank}: the shard is not the unsharded model's initial values"
        grown = (r["peak_kb"] - r["before_kb"]) * 1024
        print(f"rank {rank}: peak RSS grew by {grown / 2**20:.0f} MiB while building "
              f"({fp32_bytes / 2**20:.0f} MiB fp32 model, {r['local_params'] * 4 / 2**20:.0f} MiB shard)")
        assert grown < 0.6 * fp32_bytes, f"rank {rank}: building took {grown / 2**20:.0f} MiB of host memory"


# ---------------------------------------------------------------------------------------------
# No process needed.

def test_initial_values_do_not_depend_on_how_a_parameter_is_cut() -> None:
    """What lets every rank initialise its own shard: any slice [a, b) of a parameter's initial
    values equals the same slice of the whole, also across the generator's block boundaries."""
    from slam_pretrain.model.slam_v1 import INIT_BLOCK, fill_flat

    cfg = ModelConfig(vocab_size=4096, max_seq_len=64, d_model=512, num_heads=8, d_ff=256, ef_cycles=1,
                      segment_len=48, overlap=8)
    with torch.device("meta"):
        model = SLAMv1LM(cfg)  # shapes only: initial_values needs no storage
    name, n = "tok_emb.weight", 4096 * 512  # two generator blocks
    full = model.initial_values(name, 0, n, seed=3)
    assert full.std().item() == pytest.approx(cfg.init_std, rel=0.01)
    for a, b in [(0, 10), (INIT_BLOCK - 5, INIT_BLOCK + 7), (123_457, n), (INIT_BLOCK, INIT_BLOCK + 1)]:
        assert torch.equal(model.initial_values(name, a, b, seed=3), full[a:b]), (a, b)
    piece = torch.empty(100)  # a "shard" straddling the block boundary
    fill_flat(piece, INIT_BLOCK - 50, lambda a, b: model.initial_values(name, a, b, seed=3))
    assert torch.equal(piece, full[INIT_BLOCK - 50:INIT_BLOCK + 50])
    with pytest.raises(ValueError, match=r"tok_emb\.weight.*outside its 2097152 elements"):
        model.initial_values(name, n - 5, n + 5, seed=3)
    assert not torch.equal(model.initial_values(name, 0, 10, seed=4), full[:10])  # the seed matters
    qkv = [model.initial_values(f"{b}.attn.qkv.weight", 0, 10, seed=3) for b in ("initial_block", "final_block")]
    assert not torch.equal(*qkv)  # so does the name: same-shaped parameters start differently
    resid = model.initial_values("initial_block.ffn.down.weight", 0, 512 * 256, seed=3)
    assert resid.std().item() == pytest.approx(cfg.init_std / (2 * (cfg.ef_cycles + 2)) ** 0.5, rel=0.02)
    assert torch.equal(model.initial_values("norm_f.weight", 0, 512, seed=3), torch.ones(512))

def test_grad_accum_must_divide() -> None:
    cfg = Config()
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 4, 16
    assert grad_accum_steps(cfg.train, 2) == 2
    with pytest.raises(ConfigError, match=r"train\.global_batch_size=16.*3 data-parallel rank"):
        grad_accum_steps(cfg.train, 3)


def test_deepspeed_config_generated_and_merged() -> None:
    from slam_pretrain.engine.deepspeed_engine import deepspeed_config

    cfg = make_config("ds2", Path("/tmp/unused"))
    cfg.engine.deepspeed_extra = {"zero_optimization": {"overlap_comm": False}, "gradient_clipping": 0.5}
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": False}  # merged, ours kept
    assert ds["gradient_clipping"] == 0.5  # user keys win
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    cfg.engine.deepspeed_extra = {"train_micro_batch_size_per_gpu": 4}
    with pytest.raises(ConfigError, match="deepspeed_extra.train_micro_batch_size_per_gpu"):
        deepspeed_config(cfg, world_size=2)
    cfg.engine.deepspeed_extra = {"zero_optimization": {"stage": 3}}
    with pytest.raises(ConfigError, match="engine.zero_stage"):
        deepspeed_config(cfg, world_size=2)
    cfg.engine.deepspeed_extra, cfg.engine.offload_optimizer = {}, True
    assert deepspeed_config(cfg, 2)["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    cfg.engine.zero_stage = 0
    with pytest.raises(ConfigError, match="offload_optimizer"):
        deepspeed_config(cfg, 2)


# ---------------------------------------------------------------------------------------------
# Distributed init: where rank and rendezvous come from.

def test_resolve_env_torchrun_deepspeed_slurm_single() -> None:
    from slam_pretrain.distributed import DEFAULT_MASTER_PORT, resolve_env

    tr = resolve_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                      "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (tr["rank"], tr["world_size"], tr["local_rank"], tr["local_world_size"]) == (3, 8, 1, 4)
    assert (tr["master_addr"], tr["master_port"], tr["source"]) == ("n1", 1234, "torchrun")
    ds = resolve_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_SIZE": "2",
                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29600"})  # the deepspeed launcher
    assert ds["local_world_size"] == 2
    sl = resolve_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2", "SLURM_NODEID": "1",
                      "SLURM_TASKS_PER_NODE": "3(x2)", "SLURM_JOB_NODELIST": "gpu[07-08]",
                      "SLURM_JOB_ID": "123456"})
    assert (sl["rank"], sl["world_size"], sl["local_rank"], sl["local_world_size"]) == (5, 6, 2, 3)
    assert sl["master_addr"] == "gpu07" and sl["master_port"] == DEFAULT_MASTER_PORT + 3456
    assert sl["source"] == "slurm"
    # torchrun inside an srun step: torchrun's variables win.
    both = resolve_env({"RANK": "0", "WORLD_SIZE": "1", "SLURM_PROCID": "4", "SLURM_NTASKS": "8"})
    assert both["source"] == "torchrun" and both["world_size"] == 1
    single = resolve_env({})
    assert (single["rank"], single["world_size"], single["source"]) == (0, 1, "single")
    assert single["master_addr"] == "127.0.0.1" and single["master_port"] > 0


def test_slurm_parsers() -> None:
    from slam_pretrain.distributed import expand_nodelist, parse_tasks_per_node

    assert parse_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert parse_tasks_per_node("8") == [8]
    assert expand_nodelist("gpu[01-03,07],cpu3") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu3"]
    assert expand_nodelist("node1") == ["node1"]


_INIT_SCRIPT = """
import json, os, torch
from slam_pretrain.distributed import all_reduce_any, all_reduce_max, barrier, broadcast_object, destroy, init_distributed
info = init_distributed("cpu")
barrier()
out = {"rank": info.rank, "world": info.world_size, "local_rank": info.local_rank, "backend": info.backend,
       "main": info.is_main, "max": all_reduce_max(info.rank + 0.5), "any": all_reduce_any(info.rank == 1),
       "obj": broadcast_object({"from": info.rank})}
destroy()
print("RESULT", json.dumps(out))
"""


def _run_ranks(envs: list[dict[str, str]]) -> list[dict[str, Any]]:
    import json
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    base.update(OMP_NUM_THREADS="1", SLAM_DIST_TIMEOUT_S="60")
    procs = [subprocess.Popen([sys.executable, "-c", _INIT_SCRIPT], env={**base, **e}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for e in envs]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.split("RESULT ", 1)[1]))
    return results


def test_init_distributed_single_process_and_slurm() -> None:
    from dist_utils import free_port

    (single,) = _run_ranks([{}])  # no launcher at all: a real world of one
    assert single == {"rank": 0, "world": 1, "local_rank": 0, "backend": "gloo", "main": True, "max": 0.5,
                      "any": False, "obj": {"from": 0}}
    port = str(free_port())
    slurm = _run_ranks([{"SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
                         "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": port}
                        for r in range(2)])
    assert [r["rank"] for r in slurm] == [0, 1] and all(r["world"] == 2 for r in slurm)
    assert all(r["max"] == 1.5 and r["any"] is True and r["obj"] == {"from": 0} for r in slurm)
