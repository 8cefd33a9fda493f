"""GPU smoke check: the CUDA paths CI (CPU only) cannot run, in a few minutes on one GPU.

    python scripts/gpu_check.py --out gpu_check/            # writes gpu_check/gpu_check.json, exits 1 on a failure
    python scripts/gpu_check.py --device cpu --out gpu_check_cpu/  # the same script on CPU (what runs in CI's place)

Checks, each recorded with its figures (a failing check is recorded and the others still run):

- ``attention``: the project's attention on CUDA picks xformers, and matches SDPA (dense, causal, key
  padding, packed sequences) in bf16; the xformers/SDPA time ratio on a public-shape packed batch.
- ``alit_public_step``: a stage-1 distillation step of the public ``small`` ALIT (207.5M parameters) over the
  MaskGIT-size base VQ at 256 px under bf16 autocast: finite loss, time, peak memory; early-exit encode
  at every budget returns valid ids.
- ``bf16_vs_fp32_ids``: fraction of equal latent ids, bf16 autocast vs fp32, on the same weights.
- ``trainer``: the one training loop on CUDA through ``alit train``: base VQ, ALIT distill (bf16 autocast),
  a stop at step 20, and a resume that continues to step 30 from the checkpoint.
- ``cost_model``: at the public sizes in bf16 (``bench/mfu_bench.py``): the distillation step, a finetuning
  cycle (t = 0..7, LPIPS + GAN), the MaskGIT and AR prior steps at the public prior layout (images or
  sequences/s, and model FLOP utilisation against the bf16 matmul peak measured on the same GPU),
  tokenization images/s per budget, and the GPU-hours of the public recipes (tokenizer stage 1 and 2 on
  ImageNet-100 and ImageNet-1K, tokenization, a MaskGIT prior) derived from them, each row with its
  assumptions. The table is printed and written to ``cost_model.md``; on CPU the same code runs at the demo
  sizes (the CPU's figures, not a GPU estimate).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenizer.core.attention import _probe, attention, xformers_available, xformers_usable  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int = 5) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def check_attention(device: torch.device) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)

    def qkv(b: int, h: int, n: int, d: int) -> list[torch.Tensor]:
        return [torch.randn(b, h, n, d, generator=g, device=device, dtype=dtype) for _ in range(3)]

    out: dict[str, Any] = {"xformers_importable": xformers_available()}
    usable = device.type == "cuda" and xformers_usable(device)
    if device.type == "cuda":
        out["xformers_kernels_run"] = usable
        out["xformers_probe"] = _probe(torch.device("cuda", torch.cuda.current_device()))
    q, k, v = qkv(4, 8, 97, 64)
    mask = torch.arange(97, device=device)[None] < torch.tensor([97, 60, 33, 8], device=device)[:, None]
    backend = "xformers" if usable else "auto"  # auto = what the models get (SDPA where xformers cannot run)
    diffs = {}
    for name, kw in {"dense": {}, "causal": {"causal": True}, "key_mask": {"key_mask": mask}}.items():
        a = attention(q, k, v, backend=backend, **kw)
        b = attention(q, k, v, backend="sdpa", **kw)
        diffs[name] = float((a.float() - b.float()).abs().max())
    qp, kp, vp = qkv(1, 8, 32 + 64 + 160 + 256, 64)
    lens = [32, 64, 160, 256]
    for causal in (False, True):
        a = attention(qp, kp, vp, seqlens=lens, causal=causal, backend=backend)
        b = attention(qp, kp, vp, seqlens=lens, causal=causal, backend="sdpa")
        diffs[f"packed{'_causal' if causal else ''}"] = float((a.float() - b.float()).abs().max())
    out["max_abs_diff_vs_sdpa"] = diffs
    out["ok"] = all(d < 3e-2 for d in diffs.values())
    if usable:
        qb, kb, vb = qkv(1, 16, 64 * (257 + 256), 64)  # 64 public-size sequences packed
        seq = [257 + 256] * 64
        t_x = _timed(lambda: attention(qb, kb, vb, seqlens=seq, backend="xformers"), device)
        t_s = _timed(lambda: attention(qb, kb, vb, seqlens=seq, backend="sdpa"), device)
        out["packed_64x513_ms"] = {"xformers": 1e3 * t_x, "sdpa": 1e3 * t_s, "sdpa_over_xformers": t_s / t_x}
    return out


def _public_tokenizer(device: torch.device, small: bool) -> Any:
    from tokenizer.alit import ALITTokenizer
    from tokenizer.vq import BaseVQ, base_vq_config

    torch.manual_seed(0)
    base = BaseVQ(base_vq_config("tiny" if small else "maskgit")).to(device).eval().requires_grad_(False)
    size = "small_cpu" if small else "small"
    return ALITTokenizer.build(base, size).to(device)


def check_alit_public_step(device: torch.device, small: bool) -> dict[str, Any]:
    tok = _public_tokenizer(device, small)
    alit = tok.alit.train()
    n_params = sum(p.numel() for p in alit.parameters())
    batch = 2 if small else 8
    r = tok.image_size
    x = torch.rand(batch, 3, r, r, device=device) * 2 - 1
    opt = torch.optim.AdamW(alit.parameters(), 1e-4)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> float:
        with torch.no_grad():
            feats = tok.base.encode_features(x)
            targets = tok.base.quantize(feats).indices
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            out = alit(x, feats, targets=targets, supervise=list(range(alit.config.num_iters)))
            loss = sum(F.cross_entropy(it.logits.float().transpose(1, 2), targets.flatten(1)) + it.vq_loss
                       for it in out.iterations)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    loss = step()
    t = _timed(step, device, repeats=3)
    res: dict[str, Any] = {"params_M": n_params / 1e6, "batch": batch, "image_size": r, "loss": loss,
                           "step_s": t, "images_per_s": batch / t, "finite": bool(torch.isfinite(torch.tensor(loss)))}
    if device.type == "cuda":
        res["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    tok.eval()
    ok_ids = True
    enc_ms = {}
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        for budget in tok.budgets:
            ids = tok.encode(x, budget)
            ok_ids &= ids.shape == (batch, budget) and int(ids.min()) >= 0 and int(ids.max()) < tok.codebook_size
            enc_ms[budget] = 1e3 * _timed(lambda b=budget: tok.encode(x, b), device, repeats=3)
        images = tok.decode(tok.encode(x, tok.max_budget))
    res.update(encode_ms=enc_ms, ids_ok=bool(ok_ids), decode_shape=list(images.shape))
    res["ok"] = res["finite"] and res["ids_ok"]
    return res


def check_bf16_ids(device: torch.device, small: bool) -> dict[str, Any]:
    tok = _public_tokenizer(device, small).eval()
    x = torch.rand(4, 3, tok.image_size, tok.image_size, device=device) * 2 - 1
    with torch.no_grad():
        ref = tok.encode(x, tok.max_budget)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            low = tok.encode(x, tok.max_budget)
    same = float((ref == low).float().mean())
    return {"equal_ids": same, "ok": same > 0.5}


def check_trainer(device: torch.device, work: Path) -> dict[str, Any]:
    env = {**os.environ, "ALIT_HOME": str(work / "home"), "PYTHONPATH": str(ROOT)}
    runs = work / "runs"
    common = [f"train.device={device.type}", "train.tensorboard=false", "data.source=emoji", "train.log_every=5",
              "train.eval_every=10", "train.ckpt_every=10"]

    def alit(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "slurm.cli", "train", "tokenizer", *args, *common],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)

    res: dict[str, Any] = {}
    vq = alit("--config", "configs/tokenizer/vq_emoji_cpu.yaml", f"run_dir={runs / 'vq'}", "train.max_steps=20")
    res["vq_rc"] = vq.returncode
    distill = [f"run_dir={runs / 'distill'}", f"base={runs / 'vq' / 'final'}"]
    first = alit("--config", "configs/tokenizer/distill_emoji_cpu.yaml", *distill, "train.max_steps=20")
    second = alit("--config", "configs/tokenizer/distill_emoji_cpu.yaml", *distill, "train.max_steps=30")
    res.update(distill_rc=[first.returncode, second.returncode])
    for name, proc in (("vq", vq), ("distill_first", first), ("distill_resume", second)):
        if proc.returncode != 0:
            res[f"{name}_stderr_tail"] = proc.stderr[-3000:]
    metrics = runs / "distill" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    steps = [r["step"] for r in rows if r.get("kind") == "train"]
    res["logged_steps"] = steps
    res["resumed"] = "resum" in (second.stderr + second.stdout).lower()
    res["last_losses"] = [r.get("loss/model") for r in rows if r.get("kind") == "train"][-3:]
    res["ok"] = vq.returncode == 0 and first.returncode == 0 and second.returncode == 0 and bool(steps) \
        and max(steps) == 30 and res["resumed"]
    return res


def check_cost_model(device: torch.device, small: bool, out: Path) -> dict[str, Any]:
    from bench.mfu_bench import measure_steps, recipe_hours, render_hours
    from bench.timing import Settings

    settings = Settings(device=str(device), warmup=0, repeats=5, min_repeats=3, max_seconds=20.0)
    if small:  # CPU: smoke-test batches, one repeat (the code path, not a figure to quote)
        settings = Settings.quick_settings(device=str(device))
    result = measure_steps(device, "tiny" if small else "public", settings)
    rows = recipe_hours(result)
    table = render_hours(result, rows)
    (out / "cost_model.md").write_text(table + "\n")
    print(table, flush=True)
    steps = {k: c.to_json() for k, c in result["steps"].items()}
    ok = not result["errors"] and all(0 < c["mfu"] < 1.5 for c in steps.values())  # > 1 = a miscounted peak
    return {"steps": steps, "tokenize": result["tokenize"], "peak_bf16_gflops": result["peak_bf16_gflops"],
            "errors": result["errors"], "recipes": rows, "scale": result["scale"], "ok": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json and the training runs")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (small shapes, same checks)")
    parser.add_argument("--skip", default="", help="comma-separated checks to skip")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --device cpu for the CPU version", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    small = device.type != "cuda"
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
                            "python": sys.version.split()[0]}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    results: dict[str, Any] = {"env": info}
    checks: dict[str, Callable[[], dict[str, Any]]] = {
        "attention": lambda: check_attention(device),
        "alit_public_step": lambda: check_alit_public_step(device, small),
        "bf16_vs_fp32_ids": lambda: check_bf16_ids(device, small),
        "trainer": lambda: check_trainer(device, out),
        "cost_model": lambda: check_cost_model(device, small, out),
    }
    skip = {s for s in args.skip.split(",") if s}
    for name, fn in checks.items():
        if name in skip:
            continue
        t = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as e:  # record and go on: one broken path must not hide the others
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - t
        print(f"[gpu_check] {name}: {'ok' if results[name]['ok'] else 'FAIL'} ({results[name]['seconds']:.1f} s)",
              flush=True)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    failed = [n for n, r in results.items() if n != "env" and not r["ok"]]
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "traceback"} for k, v in results.items()},
                     indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
