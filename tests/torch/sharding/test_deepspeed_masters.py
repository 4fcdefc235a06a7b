"""DeepSpeed's float32 master weights as the EMA's source (on the CPU: DS_ACCELERATOR=cpu, gloo, 2
spawned ranks, bfloat16 training). ZeRO-3: ``EMA(engine)`` averages the optimizer's master partitions
(``fp32_partitioned_groups_flat``), exact against a float32 ``lerp_`` of the masters read after
every step (and within float32 rounding of a float64 one), while an average of the bfloat16
parameters loses the small updates; the masters followed when DeepSpeed moves their buffer; the
swap writes the rounded average into the partitions evaluation reads and puts the raw partitions and
masters back bit for bit; the full export, a DCP round trip and ``copy_to()``. ZeRO-1/2 and
BF16_Optimizer: the parameters are read, and a warning says so. One spawn for everything (the
ranks are slow to start). Needs the ``distributed`` extra (deepspeed)."""
import importlib.util
import warnings

import pytest
import torch
import torch.distributed as dist
from dist import deepspeed_on_cpu, run_ranks
from models import mlp

# found, not imported: deepspeed is imported in the ranks only (with DS_ACCELERATOR=cpu), never in pytest's process
pytestmark = [pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                 reason="needs deepspeed (pip install 'fastema[distributed]')"),
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")]

DECAYS = (0.9, 0.5)
SOURCES = {3: "deepspeed-zero3-fp32-masters", 2: "deepspeed-zero2-fp32-masters", 1: "deepspeed-bf16-fp32-masters"}


def _model():
    # partitions on 2 ranks: 0.weight 20 + 20, 0.bias 3 + 2 (one padding element on rank 1), 4.bias 1 + 0 (all
    # padding on rank 1)
    return mlp(8, 5, 16, 1, seed=0)


def _engine(rank, world, stage, accumulation=1):
    deepspeed = deepspeed_on_cpu(rank, world)

    model = _model()
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": accumulation,
           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    cfg["bf16"] = {"enabled": True}
    if stage == 1:
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}          # bf16 + ZeRO-1 + fp32 accumulation: BF16_Optimizer
    # lr 1e-3: most updates are below half a bfloat16 ulp of the weights, so the parameters barely move
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


def _step(engine, rank, step):
    g = torch.Generator().manual_seed(100 * step + rank)
    x = torch.randn(4, 8, generator=g).to(next(engine.module.parameters()).dtype)
    engine.backward((engine(x).float() - 1).square().mean())
    engine.step()


def _masters(engine):
    """name -> a copy of this rank's float32 masters of it, read from the optimizer independently of
    fastema. ZeRO-3: sub-group i's partitions lie one after another in fp32_partitioned_groups_flat[i]
    (this rank's partition, padding included). ZeRO-1/2 and BF16_Optimizer: every rank's slice of the
    flat group, gathered, cut at the parameter's offset in the 16-bit flat buffer (the full master)."""
    opt = engine.optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    out = {}
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        for params, flat in zip(opt.fp16_groups, opt.fp32_partitioned_groups_flat):
            offset = 0
            for p in params:
                out[names[id(p)]] = flat[offset:offset + p.partition_numel()].detach().clone()
                offset += p.partition_numel()
        return out
    zero2 = hasattr(opt, "single_partition_of_fp32_groups")
    masters = opt.single_partition_of_fp32_groups if zero2 else opt.fp32_groups_flat_partition
    lows = opt.bit16_groups_flat if zero2 else opt.bf16_groups_flat
    for params, master, low in zip(opt.bit16_groups if zero2 else opt.bf16_groups, masters, lows):
        parts = [torch.empty_like(master) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, master.detach())
        full = torch.cat(parts)
        for p in params:
            offset = (p.data_ptr() - low.data_ptr()) // p.element_size()
            out[names[id(p)]] = full[offset:offset + p.numel()].view(p.shape).clone()
    return out


def _low(engine, valid=False):
    """What evaluation reads: ZeRO-3's bf16 partitions, or the whole bf16 parameters. ``valid``: a ZeRO-3
    partition without its padding (the tail of the last ranks' partitions, memory DeepSpeed never writes:
    it may hold a NaN, which no comparison of values passes)."""
    out = {}
    for n, p in engine.module.named_parameters():
        t = getattr(p, "ds_tensor", p).detach().clone()
        if valid and hasattr(p, "ds_tensor"):
            t = t[:max(0, min(t.numel(), p.ds_numel - dist.get_rank() * t.numel()))]
        out[n] = t
    return out


def poison_padding(engine) -> int:
    """NaN in ZeRO-3's partitions' padding (the tail of the last rank's), 16-bit partitions and float32
    masters alike: what DeepSpeed may leave there (``_partition_param`` makes a partition with
    ``torch.empty`` and never writes its padding: its ``torch.zeros`` is commented out), here on
    purpose and on every run. Returns the elements poisoned on this rank (0 under ZeRO-1/2)."""
    opt = engine.optimizer
    if not hasattr(opt, "fp32_partitioned_groups_flat"):
        return 0
    last = dist.get_rank() == dist.get_world_size() - 1
    poisoned = 0
    with torch.no_grad():
        for params, low, master in zip(opt.fp16_groups, opt.fp16_partitioned_groups_flat,
                                       opt.fp32_partitioned_groups_flat):
            offset = 0
            for p in params:
                size, pad = p.partition_numel(), p.padding_size() if last else 0
                for flat in (low, master):
                    flat[offset + size - pad:offset + size] = float("nan")
                p.ds_tensor[size - pad:] = float("nan")
                poisoned, offset = poisoned + pad, offset + size
    return poisoned


def _same_bits(a: dict, b: dict) -> bool:
    """Bit for bit, padding included (its NaN too)."""
    as_int = {2: torch.int16, 4: torch.int32}
    return a.keys() == b.keys() and all(
        torch.equal(a[n].view(as_int[a[n].element_size()]), b[n].view(as_int[b[n].element_size()])) for n in a)


def _shadow(state, rows):
    """name -> (rows, elements) of an EMA checkpoint's averages as this rank holds them: ZeRO-3 partitions
    (DTensor shards, padding not saved), ZeRO-1/2 masters gathered to full tensors."""
    return {n: (v.to_local() if hasattr(v, "to_local") else v).reshape(rows, -1) for n, v in state["averaged"].items()}


def _case(rank, world, stage, ckpt, out, exports=True):
    import torch.distributed.checkpoint as dcp

    from fastema.torch import EMA

    engine = _engine(rank, world, stage)
    out[f"{stage}/poisoned"] = torch.tensor(poison_padding(engine))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                   # masters found: nothing to warn about
        ema = EMA(engine, list(DECAYS))
    out[f"{stage}/source"] = torch.tensor(ema.source == SOURCES[stage])
    m = _masters(engine)
    ref32 = [{n: v.clone() for n, v in m.items()} for _ in DECAYS]
    ref64 = [{n: v.double() for n, v in m.items()} for _ in DECAYS]
    low = {n: v.float() for n, v in _low(engine).items()}    # the bf16 parameters' EMA (decay 0.9)
    for step in range(4):
        _step(engine, rank, step)
        ema.update()
        if step == 2:                                    # DeepSpeed moves its master buffers (as offload_states does)
            opt = engine.optimizer
            for flat in getattr(opt, "fp32_partitioned_groups_flat", getattr(
                    opt, "single_partition_of_fp32_groups", getattr(opt, "fp32_groups_flat_partition", None))):
                flat.data = flat.data.clone()
        m = _masters(engine)
        for k, d in enumerate(DECAYS):
            for n, v in m.items():
                ref32[k][n].lerp_(v, 1 - d)
                ref64[k][n].lerp_(v.double(), 1 - d)
        for n, v in _low(engine).items():
            low[n].lerp_(v.float(), 1 - DECAYS[0])
    shadow = _shadow(ema.state_dict(), len(DECAYS))
    for n, v in shadow.items():
        for k in range(len(DECAYS)):
            out[f"{stage}/shadow/{k}/{n}"] = v[k]
            out[f"{stage}/ref32/{k}/{n}"] = ref32[k][n].flatten()[:v.shape[1]]
            out[f"{stage}/ref64/{k}/{n}"] = ref64[k][n].flatten()[:v.shape[1]]
        out[f"{stage}/low/{n}"] = low[n].flatten()[:v.shape[1]]
        out[f"{stage}/part/{n}"] = ref32[0][n].flatten()          # the whole partition (or parameter)
    out.update({f"{stage}/full/{n}": v for n, v in ema.full_state_dict(0).items()})

    # swap: the rounded average where evaluation reads it, raw parameters and masters back bit for bit
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(7)).bfloat16()
    engine.eval()
    before_m, before_low = _masters(engine), _low(engine)
    with torch.no_grad():
        out[f"{stage}/raw_before"] = engine(x)
        with ema.average_parameters():
            out[f"{stage}/swap_low_ok"] = torch.tensor(all(
                torch.equal(v, ref32[0][n].bfloat16()[:v.numel()]) for n, v in _low(engine, valid=True).items()))
            out[f"{stage}/swapped"] = engine(x)
        out[f"{stage}/raw_after"] = engine(x)
    engine.train()
    out["x"] = x
    out[f"{stage}/restored"] = torch.tensor(_same_bits(before_m, _masters(engine)) and
                                            _same_bits(before_low, _low(engine)))

    if not exports:                              # the same code as ZeRO-2's (the ranks are slow: CI time)
        return engine
    # DCP round trip, bit for bit, counters included
    with warnings.catch_warnings(record=True) as caught:        # the padding's NaN is no value's
        warnings.simplefilter("always")
        dcp.save({"ema": ema}, checkpoint_id=f"{ckpt}{stage}")
    out[f"{stage}/saved_finite"] = torch.tensor(not [w for w in caught if "inf or NaN" in str(w.message)])
    saved = _shadow(ema.state_dict(), len(DECAYS))
    _step(engine, rank, 10)
    ema.update()
    dcp.load({"ema": ema}, checkpoint_id=f"{ckpt}{stage}")
    out[f"{stage}/resumed_equal"] = torch.tensor(all(torch.equal(saved[n], v)
                                                     for n, v in _shadow(ema.state_dict(), len(DECAYS)).items()))
    out[f"{stage}/updates"] = torch.tensor([ema.updates, ema.calls])

    # copy_to(): the masters get the average, the bf16 parameters its rounding
    ema.copy_to()
    m, now = _masters(engine), _low(engine, valid=True)
    out[f"{stage}/copied"] = torch.tensor(all(
        torch.equal(m[n].flatten()[:saved[n].shape[1]], saved[n][0]) and
        torch.equal(now[n].flatten(), m[n].bfloat16().flatten()[:now[n].numel()]) for n in m))
    return engine


def _run(rank, world, ckpt):
    from fastema.torch import EMA

    out = {}
    for stage in (3, 2, 1):
        engine = _case(rank, world, stage, ckpt, out, exports=stage != 1)
    # masters not as expected (here: hidden): the bf16 parameters are read, and a warning says so once
    opt = engine.optimizer
    opt.fp32_groups_flat_partition, hidden = [], opt.fp32_groups_flat_partition
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        e = EMA(engine, 0.9)
    opt.fp32_groups_flat_partition = hidden
    said = [str(w.message) for w in caught if "master" in str(w.message)]
    out["fallback"] = torch.tensor(e.source == "parameters" and len(said) == 1 and "BF16_Optimizer" in said[0])
    return out


def test_deepspeed_fp32_masters(tmp_path):
    r0, r1 = run_ranks(_run, tmp_path / "run", 2, str(tmp_path / "ckpt"), timeout=400)
    assert r1["3/poisoned"] > 0 == r0["3/poisoned"], "ZeRO-3's padding (rank 1's) holds NaN: swaps, saves pass"
    for stage in (3, 2, 1):
        lost = 0
        for r in (r0, r1):
            assert r[f"{stage}/source"], f"stage {stage}: EMA(engine) of a bf16 engine reads the float32 masters"
            for k, v in r.items():
                if k.startswith(f"{stage}/shadow/"):
                    rest = k[len(f"{stage}/shadow/"):]
                    assert torch.equal(v, r[f"{stage}/ref32/{rest}"]), k
                    torch.testing.assert_close(v.double(), r[f"{stage}/ref64/{rest}"], rtol=4e-7, atol=1e-8)
                    if rest.startswith("0/"):
                        lost += int((v != r[f"{stage}/low/{rest[2:]}"]).sum())
            assert r[f"{stage}/swap_low_ok"], f"stage {stage}: in the swap, the bf16 parameters are the rounded average"
            assert r[f"{stage}/restored"], f"stage {stage}: after the swap, the masters and parameters are back"
            assert torch.equal(r[f"{stage}/raw_before"], r[f"{stage}/raw_after"]), stage
            assert not torch.equal(r[f"{stage}/swapped"], r[f"{stage}/raw_before"]), stage
            if stage != 1:                            # BF16_Optimizer: exports are ZeRO-2's code (not run again)
                assert r[f"{stage}/resumed_equal"] and r[f"{stage}/updates"].tolist() == [4, 4], stage
                assert r[f"{stage}/copied"], stage
                assert r[f"{stage}/saved_finite"], f"stage {stage}: a save named the padding's NaN"
        assert lost > 40, f"stage {stage}: the bf16 parameters' average should differ from the masters' (lost updates)"

        # the full export: the masters' average in the model's shapes and dtype, on every rank
        model = _model().bfloat16()
        for n, p in model.named_parameters():
            if stage == 3:                            # both ranks' partitions, cut to the parameter
                want = torch.cat([r0[f"3/part/{n}"], r1[f"3/part/{n}"]])[:p.numel()].bfloat16().view(p.shape)
            else:
                want = r0[f"{stage}/part/{n}"].bfloat16().view(p.shape)
            for r in (r0, r1):
                assert r[f"{stage}/full/{n}"].dtype == torch.bfloat16 and torch.equal(r[f"{stage}/full/{n}"], want), n
        # the eval forward under the swap is the plain model holding the rounded average
        model.load_state_dict({n: r0[f"{stage}/full/{n}"] for n, _ in model.named_parameters()})
        with torch.no_grad():
            torch.testing.assert_close(r0[f"{stage}/swapped"], model(r0["x"]), rtol=2e-2, atol=1e-2)
    assert r0["fallback"] and r1["fallback"]


def _accumulating(rank, world):
    """ZeRO-2 with gradient accumulation 2: update() after every engine.step() (DeepSpeed's loop), 8 micro-steps."""
    from fastema.torch import EMA, WindowAverage

    engine = _engine(rank, world, 2, accumulation=2)
    ema, every = EMA(engine, list(DECAYS)), EMA(engine, 0.5, update_every=2)
    window = WindowAverage(engine, window=3)
    m = _masters(engine)
    ref32 = [{n: v.clone() for n, v in m.items()} for _ in DECAYS]
    ref64 = [{n: v.double() for n, v in m.items()} for _ in DECAYS]
    out, seen = {}, [engine.global_steps]
    for micro in range(8):
        _step(engine, rank, micro)
        ema.update()
        every.update()
        window.update()
        seen.append(engine.global_steps)
        out[f"updates/{micro}"] = torch.tensor([ema.updates, ema.calls, engine.global_steps])
        if seen[-1] != seen[-2]:                          # an optimizer step: the masters moved
            m = _masters(engine)
            for k, d in enumerate(DECAYS):
                for n, v in m.items():
                    ref32[k][n].lerp_(v, 1 - d)
                    ref64[k][n].lerp_(v.double(), 1 - d)
    out["every"] = torch.tensor([every.updates, every.calls])
    out["window"] = torch.tensor([window.snapshots, window.calls])
    for n, v in _shadow(ema.state_dict(), len(DECAYS)).items():
        for k in range(len(DECAYS)):
            out[f"shadow/{k}/{n}"], out[f"ref32/{k}/{n}"], out[f"ref64/{k}/{n}"] = v[k], ref32[k][n].flatten(), \
                ref64[k][n].flatten()
    return out


def test_deepspeed_gradient_accumulation_updates_once_per_optimizer_step(tmp_path):
    """With gradient_accumulation_steps=2, DeepSpeed's loop calls engine.step() after every micro-batch and
    steps the optimizer at every second; update() after each folds only after an optimizer step
    (engine.global_steps moved), as the HF callback does: 4 updates over 8 micro-steps, the average of the
    masters after each optimizer step, update_every counting optimizer steps. (Every micro-step was folded:
    8 updates, each real step twice, the decay squared.) One rank, ZeRO-2."""
    (r,) = run_ranks(_accumulating, tmp_path / "run", 1, timeout=400)
    assert [r[f"updates/{micro}"].tolist() for micro in range(8)] == \
        [[(micro + 1) // 2, (micro + 1) // 2, (micro + 1) // 2] for micro in range(8)]
    assert r["every"].tolist() == [2, 4]
    assert r["window"].tolist() == [5, 4]              # the one at construction + one per optimizer step
    for k, v in r.items():
        if k.startswith("shadow/"):
            rest = k[len("shadow/"):]
            assert torch.equal(v, r[f"ref32/{rest}"]), k
            torch.testing.assert_close(v.double(), r[f"ref64/{rest}"], rtol=4e-7, atol=1e-8)


def _skip_run(rank, world):
    from fastema.torch import EMA

    engine = _engine(rank, world, 3)
    poisoned = poison_padding(engine)
    ema = EMA(engine, list(DECAYS), skip_nonfinite=True, copy=["0.bias"])     # a copied partition's padding too
    before = {n: getattr(v, "_local_tensor", v).clone() for n, v in ema.state_dict()["averaged"].items()}
    for step in range(3):
        _step(engine, rank, step)
        ema.update()
    after = {n: getattr(v, "_local_tensor", v) for n, v in ema.state_dict()["averaged"].items()}
    return {"poisoned": torch.tensor(poisoned), "updates": torch.tensor(ema.updates),
            "moved": torch.tensor(all(not torch.equal(after[n], before[n]) for n in after if after[n].numel()))}


def test_skip_nonfinite_looks_at_no_zero3_padding(tmp_path):
    """``skip_nonfinite=True``'s per-step scan reads only the parameters' own elements: a NaN in a ZeRO-3
    partition's padding (rank 1's, DeepSpeed never writes it) skipped every update of that rank, silently,
    while rank 0 averaged (found in round 10, session 3); so did a NaN in a copied (``copy=``) partition's
    padding (session 4's review)."""
    r0, r1 = run_ranks(_skip_run, tmp_path / "run", 2, timeout=300)
    assert r1["poisoned"] > 0
    for r in (r0, r1):
        assert r["updates"].item() == 3 and r["moved"], {k: v.tolist() for k, v in r.items()}
