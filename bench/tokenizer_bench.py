"""Stage-one benchmarks: early-exit encoding, t+1-iteration finetune steps, training-step FLOP/s, bf16.

The baselines reproduce the public ALIT code's way with this project's own modules, so both sides run
the same layers and only the schedule differs:

- :func:`encode_all_iterations`: every one of the ``num_iters`` encoder iterations runs (with the
  per-iteration decode the halting rule needs), and the requested budget's latents are taken from the
  iteration that produced them. ``ALITTokenizer.encode`` stops after ``budget / T`` iterations; the ids
  are identical (a check in the report).
- :func:`forward_all_iterations`: a finetune step supervising iteration ``t`` that runs all iterations;
  ``ALITTokenizer.forward(images, supervise=[t])`` runs ``t + 1``. The outputs at ``t`` are identical.
- :func:`adaptive_all_iterations`: the public adaptive encode: every iteration runs and every image is
  decoded to pixels at every budget, then each image takes the first budget whose L1 is below the
  threshold, else its lowest-error one. ``ALITTokenizer.encode_adaptive`` stops decoding an image once
  it has settled and stops iterating once all have; the choice is identical (a check in the report).
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from tokenizer.alit import ALIT, PAD_ID, ALITOutput, ALITTokenizer
from tokenizer.core.data import DataConfig
from tokenizer.losses import ReconstructionLoss, ReconstructionLossConfig
from tokenizer.train import DistillTask, Stage, TokenizerRunConfig, l1_01

from .hardware import Reference
from .models import TOKENIZER_SHAPES, build_tokenizer, emoji_images
from .report import Report
from .timing import Settings, compare, count_flops, ratio

GROUP_ENCODE = "encode: early exit vs all iterations"
GROUP_FINETUNE = "finetune step: t+1 iterations vs all"
GROUP_BF16 = "bf16 vs fp32 (tokenizer)"


def autocast(device: torch.device, enabled: bool) -> Any:
    """bf16 autocast on ``device`` (CPU or CUDA), or nothing."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if enabled else nullcontext()


# ============================================================================ the public code's way
@torch.no_grad()
def encode_all_iterations(tok: ALITTokenizer, images: Tensor, budget: int) -> Tensor:
    """The public way to encode at ``budget``: run all iterations, keep the ids of the one that made it."""
    alit = tok.alit
    n_all, n = alit.config.num_iters, alit.iterations_for(budget)
    features, targets = tok.features_and_targets(images)
    state, halt = alit.embed(images, features), None
    ids: Tensor | None = None
    for t in range(n_all):
        state = alit.step(state, halt)
        codes, step_ids, _ = alit.bottleneck(state)
        if t == n - 1:
            ids = step_ids  # (B, budget)
        if alit.config.halting and t < n_all - 1:
            halt = alit.halting_mask(alit.decode_logits(codes), targets)
    assert ids is not None
    return ids


@torch.no_grad()
def adaptive_all_iterations(tok: ALITTokenizer, images: Tensor, threshold: float,
                            max_budget: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The public adaptive encode, per image: all iterations, a pixel decode of every image at every budget.

    Returns ``(ids (B, max_budget) padded with PAD_ID, lengths (B,), errors (B, budgets))``: each image's
    first budget up to ``max_budget`` whose unclamped L1 in [0, 1] units is below ``threshold``, else its
    lowest-error one (the first of equal ones), and every budget's error (the straightforward reference).
    """
    alit = tok.alit
    n = alit.config.num_iters
    m = alit.iterations_for(max_budget) if max_budget is not None else n
    features, targets = tok.features_and_targets(images)
    state, halt = alit.embed(images, features), None
    all_ids, errs = [], []
    for t in range(n):
        state = alit.step(state, halt)
        codes, ids, _ = alit.bottleneck(state)  # (B, k, D), (B, k)
        logits = alit.decode_logits(codes)
        recon = tok.logits_to_images(logits)  # (B, 3, H, W) unclamped
        errs.append((recon.float() - images.float()).abs().flatten(1).mean(1) / 2)  # (B,) [0, 1] units
        all_ids.append(ids)
        if alit.config.halting and t < n - 1:
            halt = alit.halting_mask(logits, targets)
    err = torch.stack(errs, 1)  # (B, n)
    below = err[:, :m] < threshold
    pick = torch.where(below.any(1), below.float().argmax(1), err[:, :m].argmin(1))  # (B,) iteration index
    out = torch.full((images.shape[0], m * tok.tokens_per_iter), PAD_ID, dtype=torch.long, device=images.device)
    for t, ids in enumerate(all_ids[:m]):
        rows = pick == t
        out[rows, :ids.shape[1]] = ids[rows]
    return out, (pick + 1) * tok.tokens_per_iter, err


def standard_layout(tok: ALITTokenizer) -> ALITTokenizer:
    """A copy of ``tok`` whose base decoder holds standard-layout (NCHW-contiguous) weights, as the public
    code runs it: its convolutions then compute in the standard layout (the project's run channels-last)."""
    std = copy.deepcopy(tok)
    std.base.to(memory_format=torch.contiguous_format)
    return std


def run_all_iterations(alit: ALIT, images: Tensor, features: Tensor, targets: Tensor, t: int) -> ALITOutput:
    """``ALIT.forward(..., supervise=[t])`` as the public code runs it: all iterations, ``t`` decoded."""
    return alit(images, features, targets=targets, iterations=alit.config.num_iters, supervise=[t])


def forward_project(tok: ALITTokenizer, images: Tensor, t: int) -> ALITOutput:
    """What ``FinetuneTask.train_step`` runs: exactly ``t + 1`` encoder iterations."""
    return tok(images, supervise=[t])


def forward_all_iterations(tok: ALITTokenizer, images: Tensor, t: int) -> ALITOutput:
    """The public finetune forward: base features and targets as ``ALITTokenizer.forward``, all iterations."""
    features = tok.base.encode_features(images)  # (B, Cb, G, G)
    with torch.no_grad():
        targets = tok.base.quantize(features.detach()).indices  # (B, G, G)
    return run_all_iterations(tok.alit, images, features, targets, t)


Forward = Callable[[ALITTokenizer, Tensor, int], ALITOutput]


def finetune_step(tok: ALITTokenizer, loss: ReconstructionLoss, opt: torch.optim.Optimizer, images: Tensor,
                  t: int, forward: Forward) -> None:
    """One generator update of ``FinetuneTask.train_step`` (L1 + VQ; LPIPS and GAN off) with ``forward``."""
    it = forward(tok, images, t).at(t)
    recon = tok.logits_to_images(it.logits)  # (B, 3, H, W)
    g_loss, _ = loss.generator_loss(images, recon, step=0, last_layer=tok.base.last_layer)
    opt.zero_grad(set_to_none=True)
    (g_loss + it.vq_loss).backward()
    opt.step()
    tok.alit.quantize.restart_dead_codes()  # as FinetuneTask, after the update


# ============================================================================ benchmarks
def bench_encode(settings: Settings, report: Report, shape: str) -> None:
    """Encoding at each budget: ``ALITTokenizer.encode`` (early exit) vs :func:`encode_all_iterations`."""
    dev = settings.torch_device
    tok = build_tokenizer(shape, dev, settings.seed)
    batch = settings.pick(16 if shape == "small_cpu" else 2, 2 if shape == "small_cpu" else 1)
    images = emoji_images(batch, dev, tok.image_size, settings.seed)
    rows, early, full, same = [], 0.0, 0.0, True
    n = tok.config.num_iters
    for budget in tok.budgets:
        tim = compare({"early_exit": lambda b=budget: tok.encode(images, b),
                       "all_iterations": lambda b=budget: encode_all_iterations(tok, images, b)}, settings)
        same &= torch.equal(tim["early_exit"].result, tim["all_iterations"].result)
        r = ratio(tim["all_iterations"], tim["early_exit"])
        early += tim["early_exit"].median
        full += tim["all_iterations"].median
        rows.append([budget, tok.alit.iterations_for(budget), n, 1e3 * tim["early_exit"].median,
                     1e3 * tim["all_iterations"].median, r])
        report.add(f"encode.early_exit.{shape}.b{budget:04d}", r, "x", GROUP_ENCODE,
                   f"encode at budget {budget}: {tok.alit.iterations_for(budget)} of {n} iterations",
                   batch=batch, early_exit=tim["early_exit"].to_json(), all_iterations=tim["all_iterations"].to_json())
    report.add(f"encode.early_exit.{shape}.mean", full / early, "x", GROUP_ENCODE,
               f"{TOKENIZER_SHAPES[shape].what}: uniform mix of budgets (sum of times)",
               note="largest budget runs all iterations either way (~1x by design)",
               batch=batch, budgets=list(tok.budgets))
    report.table(f"encode early exit ({shape}, batch {batch})",
                 ["budget", "iters", "of", "early ms", "all ms", "speed-up"], rows)
    report.check(f"encode.{shape}.same_ids", same,
                 "early-exit ids equal the all-iterations ids at every budget" if same else
                 "early-exit and all-iterations ids DIFFER")


def bench_one_pass(settings: Settings, report: Report, shape: str, threshold: float = 0.07) -> None:
    """Tokenizing a batch for the token cache: one pass (:meth:`ALITTokenizer.encode_budgets`: the ids of
    every budget and the adaptive choice) vs what the cache did before (``encode`` per budget, then
    ``encode_adaptive``); the ids must be identical (a failed check fails the bench)."""
    dev = settings.torch_device
    tok = build_tokenizer(shape, dev, settings.seed)
    batch = settings.pick(16 if shape == "small_cpu" else 2, 2 if shape == "small_cpu" else 1)
    images = emoji_images(batch, dev, tok.image_size, settings.seed)

    def per_budget() -> tuple[dict[int, Tensor], Tensor, Tensor]:
        return ({b: tok.encode(images, b) for b in tok.budgets}, *tok.encode_adaptive(images, threshold))

    tim = compare({"one_pass": lambda: tok.encode_budgets(images, threshold), "per_budget": per_budget}, settings)
    one, (ids, adaptive, lengths) = tim["one_pass"].result, tim["per_budget"].result
    same = all(torch.equal(one.ids[b], ids[b]) for b in tok.budgets) and torch.equal(one.adaptive_ids, adaptive) \
        and torch.equal(one.adaptive_lengths, lengths)
    n = len(tok.budgets)
    r = ratio(tim["per_budget"], tim["one_pass"])
    report.add(f"encode.one_pass.{shape}", r, "x", GROUP_ENCODE,
               f"token cache batch, {n} budgets + adaptive: one pass vs per-budget encode + encode_adaptive",
               note=f"{n} vs {n * (n + 1) // 2} + up to {n} encoder iterations", batch=batch,
               one_pass=tim["one_pass"].to_json(), per_budget=tim["per_budget"].to_json())
    report.table(f"tokenize one pass ({shape}, batch {batch}, {n} budgets)",
                 ["one pass ms", "per budget ms", "speed-up"],
                 [[1e3 * tim["one_pass"].median, 1e3 * tim["per_budget"].median, r]])
    report.check(f"encode.one_pass.{shape}.same_ids", same,
                 "one-pass ids equal per-budget encode and encode_adaptive" if same else
                 "one-pass and per-budget ids DIFFER")


def bench_finetune(settings: Settings, report: Report, shape: str) -> None:
    """A finetune step supervising iteration t: t+1 encoder iterations (project) vs all (public)."""
    dev = settings.torch_device
    tok = build_tokenizer(shape, dev, settings.seed)
    batch = settings.pick(8 if shape == "small_cpu" else 2, 2 if shape == "small_cpu" else 1)
    images = emoji_images(batch, dev, tok.image_size, settings.seed)
    n = tok.config.num_iters
    with torch.no_grad():  # the baseline computes the same thing: the same logits at t
        t_mid = n // 2
        a = forward_project(tok, images, t_mid).at(t_mid).logits
        b = forward_all_iterations(tok, images, t_mid).at(t_mid).logits
        diff = float((a - b).abs().max())
    report.check(f"finetune.{shape}.same_output", diff < 1e-4,
                 f"max |logits(t+1 iterations) - logits(all)| at t={t_mid}: {diff:.1e}")
    tok.train().requires_grad_(True)
    loss = ReconstructionLoss(ReconstructionLossConfig(perceptual_weight=0.0, gan_weight=0.0)).to(dev)
    opt = torch.optim.AdamW(tok.parameters(), lr=1e-5)
    rows, proj_total, all_total = [], 0.0, 0.0
    for t in settings.pick(range(n), [0]):
        tim = compare({"t_plus_1": lambda t=t: finetune_step(tok, loss, opt, images, t, forward_project),
                       "all": lambda t=t: finetune_step(tok, loss, opt, images, t, forward_all_iterations)},
                      settings)
        proj_total += tim["t_plus_1"].median
        all_total += tim["all"].median
        rows.append([t, t + 1, n, 1e3 * tim["t_plus_1"].median, 1e3 * tim["all"].median,
                     ratio(tim["all"], tim["t_plus_1"])])
    report.add(f"finetune.t_plus_1.{shape}.mean", all_total / proj_total, "x", GROUP_FINETUNE,
               f"{TOKENIZER_SHAPES[shape].what}: a cycle of steps t = 0..{n - 1} (sum of times)",
               note="step = forward + L1/VQ loss + backward + AdamW, base trainable; LPIPS/GAN off",
               batch=batch, per_t=rows)
    report.table(f"finetune step ({shape}, batch {batch})",
                 ["t", "iters", "of", "t+1 ms", "all ms", "speed-up"], rows)


def _distill_task(shape: str, dev: torch.device, seed: int, images: Tensor, tmp: str) -> DistillTask:
    """The project's own distillation task (base frozen, all iterations supervised) for ``shape``."""
    s = TOKENIZER_SHAPES[shape]
    build_tokenizer(shape, "cpu", seed).base.save_pretrained(tmp)
    cfg = TokenizerRunConfig(stage=Stage.distill, base=tmp, alit_size=s.alit_size, alit=dict(s.alit),
                             data=DataConfig(resolution=64), val_images=1)
    torch.manual_seed(seed)
    task = DistillTask(cfg, images[:1].cpu())
    task.model.to(dev).train()
    task.model.base.eval()
    return task


def _task_step(task: DistillTask, opt: torch.optim.Optimizer, images: Tensor, bf16: bool) -> None:
    """One trainer step of the task: forward + loss (autocast), backward, clip, AdamW, the task's after-update."""
    phases = task.train_step((images,), 0)
    with autocast(images.device, bf16):
        phase = next(phases)  # the forward and the loss
    opt.zero_grad(set_to_none=True)
    phase.loss.backward()
    torch.nn.utils.clip_grad_norm_(task.model.alit.parameters(), 3.0)
    opt.step()
    for _ in phases:  # resume the task after the update (dead-code restarts); distill has one phase
        pass


def bench_tokenizer_step(settings: Settings, report: Report, shape: str, flops_out: list[dict[str, Any]],
                         refs: dict[str, Reference]) -> None:
    """The distillation training step (``DistillTask``) in fp32 and bf16: time, FLOPs, bf16 speed-up.

    The peak matmuls ``refs`` run in the same rounds; the achieved FLOP/s become fractions of them at the
    end of the run (``flops_out`` collects them). For ``small_cpu`` also the FLOP/s gain of a 4x batch.
    """
    dev = settings.torch_device
    batch = settings.pick(16 if shape == "small_cpu" else 4, 2 if shape == "small_cpu" else 1)
    images = emoji_images(4 * batch, dev, 64, settings.seed)
    with tempfile.TemporaryDirectory(prefix="alit-bench-") as tmp:
        task = _distill_task(shape, dev, settings.seed, images, tmp)
    opt = torch.optim.AdamW(task.model.alit.parameters(), lr=1e-5)
    x = images[:batch]
    flops = count_flops(lambda: _task_step(task, opt, x, False))
    tim = compare({"fp32": lambda: _task_step(task, opt, x, False), "bf16": lambda: _task_step(task, opt, x, True),
                   **{f"peak_{p}": ref.fn for p, ref in refs.items()}}, settings)
    report.add(f"bf16.speedup.tokenizer_step.{shape}", ratio(tim["fp32"], tim["bf16"]), "x", GROUP_BF16,
               f"distill training step ({shape}, batch {batch}): fp32 time / bf16-autocast time",
               fp32=tim["fp32"].to_json(), bf16=tim["bf16"].to_json())
    name = f"tokenizer_step.{shape}"
    what = f"distill step ({shape}, batch {batch}, all {task.model.config.num_iters} iterations supervised)"
    for prec in ("fp32", "bf16"):
        flops_out.append({"key": f"flops.{name}.{prec}", "precision": prec, "flops": flops,
                          "seconds": tim[prec].median, "what": what, "batch": batch,
                          "peak_gflops": refs[prec].flops / tim[f"peak_{prec}"].median / 1e9})
    if shape == "small_cpu":  # does a 4x larger batch use the machine better?
        big = images[:4 * batch]
        tb = compare({"batch": lambda: _task_step(task, opt, x, False),
                      "batch4x": lambda: _task_step(task, opt, big, False)}, settings)
        gain = 4 * tb["batch"].median / tb["batch4x"].median  # FLOPs are linear in the batch
        report.add(f"flops.{name}.batch_gain", gain, "x", "FLOP/s vs measured matmul peak",
                   f"achieved FLOP/s at batch {4 * batch} / at batch {batch} (fp32 distill step)",
                   batch=tb["batch"].to_json(), batch4x=tb["batch4x"].to_json())


def bench_bf16_tokenizer(settings: Settings, report: Report, shape: str) -> None:
    """Inference in bf16 autocast vs fp32: encode/decode speed, id agreement, reconstruction difference."""
    dev = settings.torch_device
    tok = build_tokenizer(shape, dev, settings.seed)
    batch = settings.pick(16 if shape == "small_cpu" else 4, 2 if shape == "small_cpu" else 1)
    images = emoji_images(batch, dev, tok.image_size, settings.seed)
    top = tok.max_budget

    def encode(bf16: bool, budget: int = top) -> Tensor:
        with autocast(dev, bf16):
            return tok.encode(images, budget)

    def decode(ids: Tensor, bf16: bool) -> Tensor:
        with autocast(dev, bf16):
            return tok.decode(ids).float()

    tim = compare({"fp32": lambda: encode(False), "bf16": lambda: encode(True)}, settings)
    report.add(f"bf16.speedup.encode.{shape}", ratio(tim["fp32"], tim["bf16"]), "x", GROUP_BF16,
               f"encode at budget {top} ({shape}, batch {batch}): fp32 / bf16 autocast",
               fp32=tim["fp32"].to_json(), bf16=tim["bf16"].to_json())
    ids32, ids16 = tim["fp32"].result, tim["bf16"].result
    dec = compare({"fp32": lambda: decode(ids32, False), "bf16": lambda: decode(ids32, True)}, settings)
    report.add(f"bf16.speedup.decode.{shape}", ratio(dec["fp32"], dec["bf16"]), "x", GROUP_BF16,
               f"decode {top} ids to pixels ({shape}, batch {batch}): fp32 / bf16 autocast",
               fp32=dec["fp32"].to_json(), bf16=dec["bf16"].to_json())
    # quality: the same untrained-but-real model both ways
    agree = {top: float((ids32 == ids16).float().mean())}
    for b in settings.pick(tok.budgets[:-1], ()):
        agree[b] = float((encode(False, b) == encode(True, b)).float().mean())
    report.add(f"bf16.quality.encode_id_agreement.{shape}", sum(agree.values()) / len(agree), "agree", GROUP_BF16,
               "share of latent ids equal in bf16 and fp32 encoding (mean over budgets)",
               note="untrained codebook: nearest codes are close calls, a pessimistic figure",
               per_budget=dict(sorted(agree.items())))
    rec32, rec16 = dec["fp32"].result, dec["bf16"].result
    diff = float(l1_01(rec16, rec32).mean())
    err32 = float(l1_01(rec32, images).mean())
    report.add(f"bf16.quality.decode_l1_diff.{shape}", diff, "abs", GROUP_BF16,
               "mean |bf16 - fp32| decoded pixels from the same ids ([0,1] units)",
               note=f"fp32 reconstruction error itself is {err32:.3f} (untrained)", fp32_recon_l1=err32)
    e2e16 = float(l1_01(decode(ids16, True), images).mean())
    report.add(f"bf16.quality.roundtrip_l1_delta.{shape}", e2e16 - err32, "abs", GROUP_BF16,
               "reconstruction L1 to the input: bf16 encode+decode minus fp32 encode+decode",
               fp32_l1=err32, bf16_l1=e2e16)


def bench_adaptive_worst(settings: Settings, report: Report, shape: str, tok: ALITTokenizer | None = None,
                         batch: int = 1) -> None:
    """``encode_adaptive`` when no image settles (threshold 0: an L1 is never below 0) against the public way.

    The worst case needs, per image, every budget's pixel reconstruction: an image that never settles takes
    its lowest-error budget, known only once every budget is decoded. So what it really needs is one full
    encode (``encode(images, max_budget)``: all iterations and the decoder passes halting needs) plus the
    last iteration's decoder pass and one pixel decode per budget; ``over_parts`` is its time over the sum
    of those parts, timed alone in the same rounds (<= 1: nothing else is spent). The public way
    (:func:`adaptive_all_iterations`, decoder in the standard layout) does the same work with slower
    convolutions; ``same_layout`` times it with this project's channels-last decoder (the schedule alone).
    ``tok`` replaces the registered ``shape`` (e.g. the public sizes, run by hand).
    """
    dev = settings.torch_device
    tok = tok if tok is not None else build_tokenizer(shape, dev, settings.seed)
    std = standard_layout(tok)
    images = emoji_images(batch, dev, tok.image_size, settings.seed)
    n, top = tok.config.num_iters, tok.max_budget
    with torch.no_grad():
        features, _ = tok.features_and_targets(images)
        state = tok.alit.embed(images, features)
        for _ in range(n):
            state = tok.alit.step(state)
        codes = tok.alit.bottleneck(state)[0]  # (B, top, D): a code of the largest budget
        logits = tok.alit.decode_logits(codes)

    def pixels(model: ALITTokenizer) -> Tensor:
        with torch.no_grad():
            return model.logits_to_images(logits)

    def decoder_pass() -> Tensor:
        with torch.no_grad():
            return tok.alit.decode_logits(codes)

    tim = compare({"encode_adaptive": lambda: tok.encode_adaptive(images, 0.0),
                   "public_way": lambda: adaptive_all_iterations(std, images, 0.0),
                   "all_iterations": lambda: adaptive_all_iterations(tok, images, 0.0),
                   "encode_max": lambda: tok.encode(images, top), "decoder_pass": decoder_pass,
                   "pixel_decode": lambda: pixels(tok), "pixel_decode_std": lambda: pixels(std)}, settings)
    ids, lengths = tim["encode_adaptive"].result
    ref_ids, ref_lengths, _ = tim["all_iterations"].result
    pub_ids, pub_lengths, _ = tim["public_way"].result
    same = torch.equal(ids, ref_ids) and torch.equal(lengths, ref_lengths)
    same_pub = torch.equal(ids, pub_ids) and torch.equal(lengths, pub_lengths)
    pix_diff = float((tim["pixel_decode"].result - tim["pixel_decode_std"].result).abs().max())
    pix_scale = float(tim["pixel_decode_std"].result.abs().max())
    med = {k: v.median for k, v in tim.items()}
    parts = med["encode_max"] + med["decoder_pass"] + n * med["pixel_decode"]
    fastest = {k: min(v.samples) for k, v in tim.items()}  # the least disturbed rounds (a shared machine)
    parts_min = fastest["encode_max"] + fastest["decoder_pass"] + n * fastest["pixel_decode"]
    name = f"encode.adaptive_worst.{shape}"
    what = f"encode_adaptive, nothing settles ({shape}, batch {batch}, {n} budgets)"
    report.add(name, ratio(tim["public_way"], tim["encode_adaptive"]), "x", GROUP_ENCODE,
               f"{what}: public way (all iterations + a standard-layout pixel decode each) / encode_adaptive",
               note="the worst case needs every decode; the gain is the channels-last decoder", batch=batch,
               **{k: v.to_json() for k, v in tim.items()})
    report.add(f"{name}.same_layout", ratio(tim["all_iterations"], tim["encode_adaptive"]), "x", GROUP_ENCODE,
               f"{what}: all iterations + a pixel decode each, same channels-last decoder / encode_adaptive",
               note="the same work in the worst case: ~1x by design", batch=batch)
    report.add(f"{name}.over_parts", med["encode_adaptive"] / parts, "frac", GROUP_ENCODE,
               f"{what}: time / (encode at {top} + 1 decoder pass + {n} pixel decodes, each timed alone)",
               note="<= 1 (+ noise): it costs one full encode plus the pixel decodes it needs", batch=batch,
               parts_s=parts, over_parts_of_minima=fastest["encode_adaptive"] / parts_min)
    report.add(f"decode.channels_last.{shape}", ratio(tim["pixel_decode_std"], tim["pixel_decode"]), "x",
               GROUP_ENCODE, f"one pixel decode of soft codes ({shape}, batch {batch}): standard / channels-last",
               note=f"max |difference| {pix_diff:.1e} of outputs up to {pix_scale:.1f}", max_abs_diff=pix_diff)
    report.table(f"encode_adaptive worst case ({shape}, batch {batch}, threshold 0)",
                 ["adaptive ms", "public way ms", "same layout ms", "encode max ms", "decoder pass ms",
                  "pixel decode ms", "std pixel ms", "over parts", "of minima"],
                 [[1e3 * med["encode_adaptive"], 1e3 * med["public_way"], 1e3 * med["all_iterations"],
                   1e3 * med["encode_max"], 1e3 * med["decoder_pass"], 1e3 * med["pixel_decode"],
                   1e3 * med["pixel_decode_std"], med["encode_adaptive"] / parts,
                   fastest["encode_adaptive"] / parts_min]])
    ok = same and same_pub and pix_diff <= 1e-4 * max(1.0, pix_scale) and bool((lengths > 0).all())
    report.check(f"{name}.same_choice", ok,
                 "encode_adaptive's ids and budgets equal the all-iterations reference (both layouts); "
                 f"pixel decodes agree to {pix_diff:.1e}" if ok else
                 f"encode_adaptive and the reference DIFFER (same layout {same}, standard {same_pub}, "
                 f"pixels {pix_diff:.1e})")
