"""``train.compile``: regional torch.compile of the repeated blocks (tokenizer.core.compile).

Compiled and eager training from the same seed give the same per-step losses on CPU, for the tokenizer
(a tiny ALIT distillation) and a prior (a tiny MaskGIT on synthetic tokens of three budgets); state dict
keys are unchanged; the growing ALIT sequence and the priors' varying lengths do not recompile per length.

Tolerance: inductor fuses and reorders fp32 reductions (LayerNorm, softmax, GELU, the matmul epilogues),
so one forward differs from eager by a few ulp (~1e-7 relative). The loss of step 1 is that of one
forward; later steps also carry the AdamW updates of slightly different gradients. Measured here: relative
differences of at most 1e-7 over the 4 steps; ``rtol=1e-5`` leaves a factor 100 for other CPUs and thread
counts and is still far below any real discrepancy (a wrong mask, a skipped block or a stale weight moves
the loss by 1e-3 or more).

Compiling on CPU costs tens of seconds on first use (C++ kernels; inductor caches them under
``$TORCHINDUCTOR_CACHE_DIR`` or /tmp, so a second session is faster): the tokenizer test is marked slow,
the prior test stays in the default suite.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from tokenizer.core.compile import REGION_CLASSES, compile_regions, region_kwargs
from tokenizer.core.errors import UserError
from tokenizer.core.trainer import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
RTOL, ATOL = 1e-5, 1e-6
STEPS = 4


def _cfg(compile_: bool, **kw: object) -> TrainConfig:
    base = dict(max_steps=STEPS, batch_size=8, lr=3e-3, warmup_steps=1, ema_decay=0.0, eval_every=0,
                ckpt_every=1000, log_every=1, progress=False, tensorboard=False, num_workers=0, compile=compile_)
    return TrainConfig(**{**base, **kw})


def _losses(trainer: Trainer) -> list[float]:
    return [row["loss/model"] for row in trainer.history]


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@pytest.fixture(autouse=True, scope="module")
def _one_compile_thread():
    """Compile in this process: a pool of compile workers (each importing torch) costs more than it saves
    on the shared 2-core test machine (a cold prior test: 134 s with the default 2 threads, 69 s with 1)."""
    import torch._inductor.config as inductor_config

    with inductor_config.patch(compile_threads=1):
        yield


def _distill_task(base: Path):  # -> tokenizer.train.DistillTask
    from tokenizer.train import DistillTask, Stage, TokenizerRunConfig

    cfg = TokenizerRunConfig(stage=Stage.distill, base=str(base), alit_size="tiny")
    torch.manual_seed(0)  # model initialisation, as train_tokenizer
    return DistillTask(cfg, torch.zeros(2, 3, 64, 64))


# ============================================================================ no compilation needed (fast)
def test_regions_keys_and_frozen_parts(base_vq: Path) -> None:
    import importlib

    for name in REGION_CLASSES:  # every named region class exists (a rename would silently compile nothing)
        module, cls = name.rsplit(".", 1)
        assert issubclass(getattr(importlib.import_module(module), cls), torch.nn.Module), name
    task = _distill_task(base_vq)
    model = task.model
    keys = list(model.state_dict())
    n = compile_regions(task.modules())
    blocks = [m for m in model.alit.modules() if region_kwargs(m) is not None]
    assert n == len(blocks) == model.alit.config.depth + model.alit.config.decoder_layers
    assert all(b._compiled_call_impl is not None for b in blocks)
    # the frozen base's resnets stay eager; a second call compiles nothing more
    assert all(m._compiled_call_impl is None for m in model.base.modules())
    assert compile_regions(task.modules()) == 0
    from tokenizer.core import attention  # its Python-side helpers are graph breaks in the compiled blocks

    assert attention._EAGER_UNDER_COMPILE and all(
        getattr(getattr(attention, name), "_torchdynamo_disable", False) for name in attention._EAGER_UNDER_COMPILE)
    assert list(model.state_dict()) == keys  # checkpoints and exports keep their eager names
    clone = copy.deepcopy(model)  # the trainer's EMA/export copy runs eager
    assert all(m._compiled_call_impl is None for m in clone.modules())


def test_models_import_without_torch_dynamo() -> None:
    """torch.compiler.disable is applied when a compile is set up, not at import: importing torch._dynamo
    costs about 1.3 s in every process (each job, rank and CLI call), and most never compile."""
    code = ("import sys, tokenizer.alit, generator.train, generator.ar, generator.maskgit; "
            "print('torch._dynamo' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stdout + proc.stderr[-2000:]


def test_missing_compiler_is_a_user_error() -> None:
    import torch._inductor.config as inductor_config

    with inductor_config.patch({"cpp.cxx": ("no-such-c++-compiler",)}), \
            pytest.raises(UserError, match=r"C\+\+ compiler.*train\.compile=false"):
        compile_regions({"model": torch.nn.Linear(2, 2)})


def test_backend_failure_at_first_call_is_a_user_error() -> None:
    from torch._dynamo.exc import BackendCompilerFailed

    from tokenizer.core.compile import _explained

    def fails() -> None:
        raise BackendCompilerFailed(lambda: None, RuntimeError("Python.h: No such file"), None)

    with pytest.raises(UserError, match=r"Python\.h.*train\.compile=false"):
        _explained(fails, "model.encoder.transformer.0 (Block)")()


# ============================================================================ compiled == eager
@pytest.mark.slow  # ~1-2 min cold on 2 shared cores; the ALIT regions are checked above without compiling
def test_tokenizer_compiled_matches_eager(base_vq: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(32, 3, 64, 64, generator=g) * 2 - 1)
    runs: dict[bool, Trainer] = {}
    for compile_ in (False, True):
        graphs = _graphs()
        runs[compile_] = tr = Trainer(_cfg(compile_), tmp_path / str(compile_), _distill_task(base_vq), data)
        tr.fit()
        if compile_:
            assert _graphs() > graphs  # frames really compiled
            # one dynamic graph for the 4 sequence lengths of a step (69, 73, 77, 81), fwd + bwd
            assert _graphs() - graphs <= 2
        else:
            assert _graphs() == graphs
    assert re.search(r"torch\.compile: [1-9]\d* repeated blocks compiled", capsys.readouterr().err)
    eager, compiled = _losses(runs[False]), _losses(runs[True])
    assert len(eager) == STEPS
    torch.testing.assert_close(compiled, eager, rtol=RTOL, atol=ATOL)
    assert eager[-1] < eager[0]  # it trains (the losses compared are not constants)
    a, b = runs[False].modules["model"].state_dict(), runs[True].modules["model"].state_dict()
    assert list(a) == list(b)
    for k in a:  # the weights too; the key rows of in_proj_bias have a zero true gradient (softmax is
        # shift-invariant), so AdamW moves them by normalised rounding noise, up to lr per step (1.7e-4 seen)
        tol = {"atol": STEPS * 3e-3, "rtol": 0} if k.endswith("attn.in_proj_bias") else {"atol": 1e-5, "rtol": 1e-4}
        torch.testing.assert_close(b[k], a[k], **tol, msg=k)


@pytest.mark.slow  # 44 s of inductor compile on 2 cores; the tokenizer case is slow-marked too
def test_prior_compiled_matches_eager(tmp_path: Path) -> None:
    from generator.tasks import PriorTask, TokenDataset, build_prior, collate_tokens
    from generator.tokens import pad_sequences

    k, tpi = 16, 4
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (48,), generator=g)
    data = TokenDataset({b: torch.randint(0, k, (48, b), generator=g) for b in (4, 8, 12)}, labels)
    runs: dict[bool, Trainer] = {}
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = build_prior("maskgit", "tiny", codebook_size=k, tokens_per_iter=tpi, num_budgets=3,
                            num_classes=2)
        torch.nn.init.normal_(model.head.weight, std=0.1)  # not the zero head: the loss moves from step 1
        keys = list(model.state_dict())
        graphs = _graphs()
        runs[compile_] = tr = Trainer(_cfg(compile_), tmp_path / str(compile_), PriorTask(model), data,
                                      collate_fn=collate_tokens)
        tr.fit()
        assert list(model.state_dict()) == keys
        assert (_graphs() > graphs) == compile_
    eager, compiled = _losses(runs[False]), _losses(runs[True])
    assert len(eager) == STEPS and len(set(eager)) == STEPS
    torch.testing.assert_close(compiled, eager, rtol=RTOL, atol=ATOL)

    # more shapes (padded lengths 6..14 = 2 prefix + budgets 4, 8, 12; batch sizes 2..5; backward) reuse
    # the training graphs without recompiling; batch size 1 and no_grad add graphs but run
    model = runs[True].modules["model"].train()  # fit() left it in eval mode (the export)
    graphs = _graphs()
    for i in range(9):
        seqs = [torch.randint(0, k, (4 * (1 + (i + j) % 3),), generator=g) for j in range(2 + i % 4)]
        ids, lengths = pad_sequences(seqs)
        model(ids, lengths, torch.zeros(len(seqs), dtype=torch.long)).sum().backward()
    assert _graphs() == graphs
    with torch.no_grad():
        for n in (4, 12):
            ids, lengths = pad_sequences([torch.randint(0, k, (n,), generator=g)])
            model(ids, lengths, torch.zeros(1, dtype=torch.long))
