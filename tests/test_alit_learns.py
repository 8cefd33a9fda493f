"""ALIT learns on CPU: a short distillation of the demo's ALIT on real images leaves the image-independent
plateau (issue 13, item 5).

The plateau is the cross-entropy of predicting each grid cell's base index from that cell's marginal over
the training images (what a model that ignores the image can reach). After a short distillation with the
demo's ALIT configuration (``configs/tokenizer/distill_emoji_cpu.yaml``, its task and losses) the
held-out cross-entropy at the largest budget must be clearly below it (0.3 nats). Whether more tokens
then predict better is the recurrence sweep's question (configs/sweeps/recurrence_emoji_cpu.yaml).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenizer.core.config import load_config
from tokenizer.core.data import DataConfig, build_dataset
from tokenizer.train import DistillTask, TokenizerRunConfig
from tokenizer.vq import BaseVQ, base_vq_config

STEPS = 120
TRAIN, VAL = 256, 64


def _images(split: str, n: int) -> torch.Tensor:
    ds = build_dataset(DataConfig(source="emoji", resolution=64, hflip=False), split)
    return torch.stack([ds[i][0] for i in range(min(n, len(ds)))])


def _marginal_ce(train_targets: torch.Tensor, val_targets: torch.Tensor, k: int) -> float:
    """Held-out CE (nats) of the per-position marginal of the base indices (add-one smoothed)."""
    counts = torch.ones(train_targets.shape[1], k)
    counts.scatter_add_(1, train_targets.t(), torch.ones_like(train_targets.t(), dtype=torch.float))
    logp = (counts / counts.sum(1, keepdim=True)).log()  # (N, K)
    return float(-logp.gather(1, val_targets.t()).mean())


def test_distillation_leaves_the_plateau(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = BaseVQ(base_vq_config("tiny")).eval()  # a fixed (random) base: its indices depend on the image
    base.save_pretrained(tmp_path / "base")
    cfg = load_config(TokenizerRunConfig, "configs/tokenizer/distill_emoji_cpu.yaml",
                      [f"base={tmp_path / 'base'}", f"run_dir={tmp_path / 'run'}"])
    train, val = _images("train", TRAIN), _images("val", VAL)
    task = DistillTask(cfg, val)
    task.setup(torch.device("cpu"))
    tok = task.model
    with torch.no_grad():
        train_t = tok.features_and_targets(train)[1]
        val_t = tok.features_and_targets(val)[1]
    plateau = _marginal_ce(train_t, val_t, tok.config.base_codebook_size)
    opt = torch.optim.AdamW(tok.alit.parameters(), lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                            weight_decay=cfg.train.weight_decay)
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        tok.train()
        batch = train[torch.randint(0, len(train), (cfg.train.batch_size,), generator=g)]
        for phase in task.train_step((batch,), step):
            opt.zero_grad(set_to_none=True)
            phase.loss.backward()
            opt.step()
    tok.eval()
    with torch.no_grad():
        ce = {b: float(F.cross_entropy(tok.decode_logits(tok.encode(val, b)).transpose(1, 2), val_t))
              for b in tok.budgets}
    print(f"plateau {plateau:.3f} nats; held-out CE per budget {ce}")
    assert all(math.isfinite(v) for v in ce.values())
    assert ce[tok.max_budget] < plateau - 0.3, (ce, plateau)  # clearly image-dependent
