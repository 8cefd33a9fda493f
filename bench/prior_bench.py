"""Stage-two benchmarks: AR KV cache, MaskGIT sampling rates, packed vs padded batches, prior step FLOP/s,
bf16 vs fp32 of the priors (speed and output agreement)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from generator.ar import AR
from generator.maskgit import MaskGIT, maskgit_loss
from sampling.ar_sampler import ARSampler
from sampling.maskgit_sampler import MaskGITSampler

from .hardware import Reference
from .models import PRIOR_PUBLIC_LAYOUT, PRIOR_SHAPE, build_prior, build_tokenizer, mixed_budget_batch
from .report import Report
from .timing import Settings, Timing, compare, count_flops, ratio
from .tokenizer_bench import autocast

GROUP_AR = "AR sampling: KV cache vs recompute"
GROUP_MASKGIT = "MaskGIT sampling rate"
GROUP_PACK = "mixed-budget batch: packed vs padded"
GROUP_BF16 = "bf16 vs fp32 (priors)"

PRIOR_DESC = (f"W{PRIOR_SHAPE['width']} D{PRIOR_SHAPE['depth']} K={PRIOR_SHAPE['codebook_size']}, "
              f"{PRIOR_SHAPE['tokens_per_iter']} tok x {PRIOR_SHAPE['num_budgets']} budgets")


# ============================================================================ AR: KV cache
def _on_threads(threads: int, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``fn()`` with ``threads`` torch intra-op threads, the setting restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def bench_ar_cache(settings: Settings, report: Report, layout: str) -> None:
    """``ARSampler(use_cache=True)`` vs ``use_cache=False`` at the largest budget; the tokens must agree.

    On a CPU with more than one thread, the public layout (256 tokens) is also timed with both sides on one
    thread, in the same interleaved rounds: a cached step is a few dozen tiny ops (rows = batch), and on
    a shared machine each op that forks onto a second thread waits for it to be scheduled, which the
    recomputed steps (rows = batch x prefix) pay as well but amortise over more work. A cached side runs
    ``calls`` samplings per timed round (its time is per sampling), so that one burst of load on the shared
    machine does not weigh ~10x more on the short side than on the long one.
    """
    dev = settings.torch_device
    shape = PRIOR_SHAPE if layout == "small" else PRIOR_PUBLIC_LAYOUT
    model: AR = build_prior("ar", dev, settings.seed, **shape)  # type: ignore[assignment]
    budget = settings.pick(model.space.max_budget, model.space.budgets[0])
    batch = settings.pick(8 if layout == "small" else 2, 2 if layout == "small" else 1)
    classes = torch.arange(batch) % model.config.num_classes

    def sample(use_cache: bool) -> torch.Tensor:
        sampler = ARSampler(temperature=1.0, top_k=0, use_cache=use_cache)
        return sampler.sample(model, budget, classes, generator=torch.Generator().manual_seed(settings.seed)).ids

    calls = settings.pick(4 if layout == "public" else 1, 1)

    def cached() -> torch.Tensor:
        return [sample(True) for _ in range(calls)][-1]

    sides: dict[str, Callable[[], torch.Tensor]] = {"cache": cached, "recompute": lambda: sample(False)}
    one_thread = layout == "public" and dev.type == "cpu" and settings.threads > 1
    if one_thread:
        sides |= {"cache_1t": lambda: _on_threads(1, cached), "recompute_1t": lambda: _on_threads(1, lambda: sample(False))}
    tim = compare(sides, settings)
    for name in ("cache", "cache_1t") if one_thread else ("cache",):  # seconds per sampling
        tim[name] = Timing([t / calls for t in tim[name].samples], tim[name].result)
    agree = min(float((tim[name].result == tim["recompute"].result).float().mean()) for name in sides)
    report.check(f"ar_cache.{layout}.same_tokens", agree == 1.0,
                 f"share of sampled tokens equal with and without the cache: {agree:.4f}")
    desc = PRIOR_DESC if layout == "small" else f"public layout {shape['tokens_per_iter']} tok x 8, K=4096"
    per_token = {f"{name}_ms_per_token": 1e3 * t.median / budget for name, t in tim.items()}
    report.add(f"ar.kv_cache.{layout}", ratio(tim["recompute"], tim["cache"]), "x", GROUP_AR,
               f"sample {batch} x {budget} tokens ({desc}): recompute time / KV-cache time",
               batch=batch, budget=budget, threads=settings.threads if dev.type == "cpu" else None, cache_calls=calls,
               cache=tim["cache"].to_json(), recompute=tim["recompute"].to_json(), **per_token)
    if one_thread:
        report.add(f"ar.kv_cache.{layout}.one_thread", ratio(tim["recompute_1t"], tim["cache_1t"]), "x", GROUP_AR,
                   f"the same, both sides on 1 torch thread (rounds interleaved with the {settings.threads}-thread "
                   "ones): recompute time / KV-cache time",
                   note=f"KV cache {per_token['cache_1t_ms_per_token']:.2f} ms/token on 1 thread, "
                        f"{per_token['cache_ms_per_token']:.2f} on {settings.threads}",
                   batch=batch, budget=budget, threads=1, cache=tim["cache_1t"].to_json(),
                   recompute=tim["recompute_1t"].to_json())


# ============================================================================ MaskGIT images/s
def bench_maskgit_sampling(settings: Settings, report: Report) -> None:
    """Images/s of MaskGIT sampling per budget and step count, tokens only and with the tokenizer's decode,
    in fp32 and bf16 autocast (a detail table; the headline is the largest budget at 8 steps)."""
    dev = settings.torch_device
    model: MaskGIT = build_prior("maskgit", dev, settings.seed)  # type: ignore[assignment]
    tok = build_tokenizer("small_cpu", dev, settings.seed)  # same K, T and budgets as the prior
    batch = settings.pick(16, 2)
    classes = torch.arange(batch) % model.config.num_classes
    budgets = settings.pick(list(model.space.budgets), [model.space.budgets[0], model.space.max_budget])
    step_counts = settings.pick([4, 8, 16], [8])
    cell = replace(settings, repeats=3, min_repeats=2, max_seconds=0.5, warmup=1) \
        if not settings.quick else settings

    def sample(budget: int, steps: int, bf16: bool) -> torch.Tensor:
        with autocast(dev, bf16):
            out = MaskGITSampler(steps=steps).sample(model, budget, classes,
                                                     generator=torch.Generator().manual_seed(settings.seed))
        return out.ids

    def decode(ids: torch.Tensor, bf16: bool) -> torch.Tensor:
        with autocast(dev, bf16):
            return tok.decode(ids)

    rows: list[list[Any]] = []
    headline: dict[str, float] = {}
    for budget in budgets:
        ids = sample(budget, 8, False)
        dec = compare({"fp32": lambda i=ids: decode(i, False), "bf16": lambda i=ids: decode(i, True)}, cell)
        for steps in step_counts:
            tim = compare({"fp32": lambda b=budget, s=steps: sample(b, s, False),
                           "bf16": lambda b=budget, s=steps: sample(b, s, True)}, cell)
            row: list[Any] = [budget, steps]
            for prec in ("fp32", "bf16"):
                t_sample, t_dec = tim[prec].median, dec[prec].median
                row += [batch / t_sample, batch / (t_sample + t_dec)]
                if budget == model.space.max_budget and steps == 8:
                    headline[prec] = batch / (t_sample + t_dec)
                    headline[f"{prec}_tokens_only"] = batch / t_sample
            rows.append(row)
    report.table(f"MaskGIT sampling images/s ({PRIOR_DESC}, batch {batch}; +dec = with ALIT small_cpu decode)",
                 ["budget", "steps", "fp32", "fp32+dec", "bf16", "bf16+dec"], rows)
    top = model.space.max_budget
    for prec in ("fp32", "bf16"):
        report.add(f"maskgit.images_per_s.{prec}", headline[prec], "img/s", GROUP_MASKGIT,
                   f"sample + decode at budget {top}, 8 steps, batch {batch}, {prec} (table: every budget/steps)",
                   tokens_only=headline[f"{prec}_tokens_only"], grid=rows)
    report.add("bf16.speedup.maskgit_sampling", headline["bf16"] / headline["fp32"], "x", GROUP_BF16,
               f"MaskGIT sample + decode at budget {top}, 8 steps: bf16 images/s / fp32 images/s")


# ============================================================================ packing
def _maskgit_train_step(model: MaskGIT, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, ...],
                        packed: bool, bf16: bool = False) -> None:
    ids, lengths, classes = batch
    with autocast(ids.device, bf16):
        loss = maskgit_loss(model, ids, lengths, classes, generator=torch.Generator().manual_seed(1),
                            packed=packed).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def bench_packing(settings: Settings, report: Report) -> None:
    """A mixed-budget MaskGIT batch run packed (``packed=True``) vs padded to the longest budget: the demo's
    prior (8 x 4 budgets) at batch 16 and 64, and the public layout (32 x 8 budgets, up to 256 tokens) at 16."""
    dev = settings.torch_device
    cases = [("", PRIOR_SHAPE, 16), ("", PRIOR_SHAPE, 64), ("public.", PRIOR_PUBLIC_LAYOUT, 16)]
    models: dict[str, MaskGIT] = {}
    for tag, shape, size in cases:
        if tag not in models:
            models[tag] = build_prior("maskgit", dev, settings.seed, **shape)  # type: ignore[assignment]
        model = models[tag]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        batch = mixed_budget_batch(model, size, settings.seed, dev)
        ids, lengths, _ = batch
        real = float(lengths.sum()) / (size * model.space.max_budget)
        model.eval()
        with torch.no_grad():
            fwd = compare({"padded": lambda b=batch, m=model: m(*b),
                           "packed": lambda b=batch, m=model: m(*b, packed=True)}, settings)
        diff = float((fwd["padded"].result - fwd["packed"].result)[ids >= 0].abs().max())
        report.check(f"packing.{tag}b{size}.same_logits", diff < 1e-4,
                     f"max |packed - padded| logits at real slots, batch {size}: {diff:.1e}")
        model.train()
        step = compare({"padded": lambda b=batch, m=model, o=opt: _maskgit_train_step(m, o, b, False),
                        "packed": lambda b=batch, m=model, o=opt: _maskgit_train_step(m, o, b, True)}, settings)
        model.eval()
        layout = ("public layout, 32 tok x 8 budgets" if tag else
                  f"{PRIOR_SHAPE['tokens_per_iter']} tok x {PRIOR_SHAPE['num_budgets']} budgets")
        for name, tim in (("forward", fwd), ("train_step", step)):
            report.add(f"packing.{name}.{tag}b{size}", ratio(tim["padded"], tim["packed"]), "x", GROUP_PACK,
                       f"MaskGIT {name.replace('_', ' ')} ({layout}), {size} sequences of mixed budgets "
                       f"({real:.0%} of the padded slots real): padded time / packed time",
                       note="" if dev.type == "cuda" else "CPU: packed attention runs one SDPA batch per sequence length",
                       real_fraction=real, padded=tim["padded"].to_json(), packed=tim["packed"].to_json())


# ============================================================================ prior step FLOP/s
def bench_prior_step(settings: Settings, report: Report, flops_out: list[dict[str, Any]],
                     refs: dict[str, Reference]) -> None:
    """The MaskGIT training step (padded, the default) in fp32 and bf16: FLOPs, time, bf16 speed-up
    (the peak matmuls ``refs`` interleaved, as in ``bench_tokenizer_step``)."""
    dev = settings.torch_device
    model: MaskGIT = build_prior("maskgit", dev, settings.seed)  # type: ignore[assignment]
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    size = settings.pick(64, 4)
    batch = mixed_budget_batch(model, size, settings.seed, dev)
    flops = count_flops(lambda: _maskgit_train_step(model, opt, batch, False))
    tim = compare({"fp32": lambda: _maskgit_train_step(model, opt, batch, False),
                   "bf16": lambda: _maskgit_train_step(model, opt, batch, False, bf16=True),
                   **{f"peak_{p}": ref.fn for p, ref in refs.items()}}, settings)
    report.add("bf16.speedup.prior_step", ratio(tim["fp32"], tim["bf16"]), "x", GROUP_BF16,
               f"MaskGIT training step (batch {size}, padded): fp32 time / bf16-autocast time",
               fp32=tim["fp32"].to_json(), bf16=tim["bf16"].to_json())
    for prec in ("fp32", "bf16"):
        flops_out.append({"key": f"flops.prior_step.maskgit.{prec}", "precision": prec, "flops": flops,
                          "seconds": tim[prec].median, "batch": size,
                          "peak_gflops": refs[prec].flops / tim[f"peak_{prec}"].median / 1e9,
                          "what": f"MaskGIT training step ({PRIOR_DESC}, batch {size} mixed budgets, padded)"})


# ============================================================================ bf16 quality of the priors
def bench_bf16_priors(settings: Settings, report: Report) -> None:
    """The same priors' logits in bf16 autocast vs fp32: max |difference| and argmax agreement."""
    dev = settings.torch_device
    size = settings.pick(64, 4)
    for kind in ("maskgit", "ar"):
        model = build_prior(kind, dev, settings.seed)
        ids, lengths, classes = mixed_budget_batch(model, size, settings.seed, dev)
        real = ids >= 0
        if kind == "maskgit":  # half of the real slots masked, as mid-way through sampling
            g = torch.Generator().manual_seed(settings.seed)
            hide = (torch.rand(ids.shape, generator=g) < 0.5).to(dev) & real
            ids = ids.masked_fill(hide, model.space.mask_id)
        with torch.no_grad():
            ref = model(ids, lengths, classes).float()[real]  # (M, K)
            with autocast(dev, True):
                low = model(ids, lengths, classes).float()[real]
        diff = float((low - ref).abs().max())
        spread = float(ref.std())
        agree = float((low.argmax(-1) == ref.argmax(-1)).float().mean())
        report.add(f"bf16.quality.{kind}_logit_maxabs", diff, "abs", GROUP_BF16,
                   f"{kind}: max |bf16 - fp32| logit over {int(real.sum())} real slots",
                   note=f"logit std {spread:.3f} (untrained, head N(0, 0.02))", logit_std=spread)
        report.add(f"bf16.quality.{kind}_argmax_agreement", agree, "agree", GROUP_BF16,
                   f"{kind}: share of slots whose most likely id is the same in bf16 and fp32",
                   note="near-uniform untrained logits: a pessimistic figure")
