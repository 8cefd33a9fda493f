"""``train.compile``: regional ``torch.compile`` of the repeated blocks of a task's modules.

Tasks call many methods of their modules (``encode``, ``step``, ``decode_logits`` ...), not only
``forward``, so compiling a whole module's forward would miss most of the work. Instead each repeated
block is compiled in place with :meth:`torch.nn.Module.compile` (PyTorch's *regional compilation*
recipe): Dynamo compiles the block class's ``forward`` once and every instance of that class with the
same parameter shapes reuses the graph (parameters are graph inputs), so compile time does not grow
with depth, and any method that runs the blocks runs them compiled.

The regions (:data:`REGION_CLASSES`, matched by qualified class name, so this layer imports none of
the model packages):

- ``tokenizer.alit.Block``: the ALIT encoder and latent-decoder transformer blocks. They hold nearly
  all of ALIT's compute and run ``num_iters`` times per step (the recurrence), on a sequence that grows
  by ``tokens_per_iter`` each iteration.
- ``generator.transformer.Block``: the MaskGIT and AR prior blocks (the priors' whole transformer),
  which see a different padded length per batch.
- ``tokenizer.vqgan.ResnetBlock`` and diffusers' ``ResnetBlock2D`` (``tokenizer.vq.BaseVQ``): the conv
  residual blocks of the base tokenizers (stage ``vq``, and ``finetune`` where the base trains).

Left eager: everything between the blocks (embeddings, quantizers, losses: small, and full of
data-dependent Python such as halting and dead-code restarts), and blocks whose parameters are all
frozen when the switch is applied (the distill stage's base tokenizer, LPIPS): they run forward-only
under ``no_grad``, and their many distinct conv shapes (one graph each) would cost more compile time
than they save next to ALIT. Discriminators (``tokenizer.losses.PatchDiscriminator``, one plain
``nn.Sequential`` each, one of them run per step) hold no repeated block and stay eager.

Shapes: the transformer blocks are compiled with ``dynamic=True`` (batch and length symbolic from the
first call), so the growing ALIT sequence and the priors' budgets share one graph instead of one static
graph for the first length and a dynamic one after it; the conv blocks keep the default (``dynamic=None``:
static, dims made dynamic on their first recompile). Graphs are keyed per class ``forward``: a class sees
one graph per distinct parameter shape, grad mode (training vs ``no_grad`` evaluation) and train/eval
flag, so a large VQGAN's resnets exceed Dynamo's default limit of 8 graphs per function, after which the
rest would silently run eager; :func:`compile_regions` raises ``torch._dynamo.config.recompile_limit``
to at least :data:`RECOMPILE_LIMIT` (it never lowers it).

Attention: on CPU the blocks call PyTorch SDPA, which compiles into the graph. On CUDA they may call
xformers (``tokenizer.core.attention``); its device probe and its kernel call are marked
``torch.compiler.disable`` there (Python probes, and masks built from Python lists), so a block then
graph-breaks around the attention call: the code before and after it is still compiled, the attention
itself runs as in eager. The same holds for packed prior batches (``seqlens``) on SDPA: without the
break, the per-length loop would be unrolled and recompiled for every batch's set of lengths. (Not
measured on a GPU here.)

State dicts: :meth:`~torch.nn.Module.compile` keeps the module (no ``_orig_mod.`` wrapper), so the
parameter names, checkpoints and exports of a compiled run are those of an eager one, and
``copy.deepcopy`` (the trainer's EMA copy for evaluation and export) drops the compiled call (it is
excluded from the module's pickled state) and runs eager.

Requirements: inductor builds C++ kernels for CPU tensors (a C++ compiler: ``$CXX`` or ``g++``, and the
Python headers) and Triton kernels for CUDA ones; :func:`compile_regions` checks the compiler / Triton
up front and a backend failure at the first compiled call is raised as a :class:`UserError`, each
naming the fix ``train.compile=false``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch._dynamo
from torch import nn

from .attention import disable_in_compiled_code
from .errors import UserError, one_line

# qualified class name -> torch.compile keyword arguments of its instances
REGION_CLASSES: dict[str, dict[str, Any]] = {
    "tokenizer.alit.Block": {"dynamic": True},  # sequence length grows with the recurrence
    "generator.transformer.Block": {"dynamic": True},  # padded length varies per batch
    "tokenizer.vqgan.ResnetBlock": {},  # fixed shapes per instance
    "diffusers.models.resnet.ResnetBlock2D": {},
}
RECOMPILE_LIMIT = 64  # graphs per compiled forward before Dynamo falls back to eager
FIX = "set train.compile=false to train eager"


def region_kwargs(module: nn.Module) -> dict[str, Any] | None:
    """The ``torch.compile`` arguments of ``module`` when its class (or a base class) is a region, else None."""
    for cls in type(module).__mro__:
        kwargs = REGION_CLASSES.get(f"{cls.__module__}.{cls.__qualname__}")
        if kwargs is not None:
            return kwargs
    return None


def _devices(modules: Mapping[str, nn.Module]) -> set[str]:
    return {t.device.type for m in modules.values() for t in (*m.parameters(), *m.buffers())}


def check_backend(device_types: set[str]) -> None:
    """Raise :class:`UserError` when inductor cannot build kernels for these device types."""
    if not torch._dynamo.is_dynamo_supported():
        raise UserError(f"train.compile=true: torch.compile is not supported on this Python/platform "
                        f"(torch {torch.__version__}); {FIX}")
    if "cpu" in device_types:
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()  # the search inductor itself runs: torch._inductor.config.cpp.cxx ($CXX, g++)
        except Exception as e:
            raise UserError("train.compile=true: inductor's CPU backend needs a C++ compiler and none was "
                            f"found ({type(e).__name__}); install g++ (or point $CXX at one), or {FIX}") from e
    if "cuda" in device_types:
        from torch.utils._triton import has_triton

        if not has_triton():
            raise UserError(f"train.compile=true: inductor's CUDA backend needs Triton, which does not import "
                            f"or finds no supported GPU here; pip install triton, or {FIX}")


def _explained(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """``fn`` with a backend failure (compiler missing or broken, no Python headers ...) as a UserError."""
    from torch._dynamo.exc import BackendCompilerFailed

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BackendCompilerFailed as e:
            raise UserError(f"train.compile=true: torch.compile failed to build {name}: "
                            f"{one_line(e)[:400]}; {FIX}") from e

    return call


def compile_regions(modules: Mapping[str, nn.Module]) -> int:
    """Compile the repeated blocks of ``modules`` in place (see the module docstring); returns how many.

    Call after the modules are on their device. A block shared by two entries is compiled once; a block
    already compiled, or with no trainable parameter, is left as it is. State dict keys do not change.
    """
    check_backend(_devices(modules))
    disable_in_compiled_code()  # attention's Python-side helpers stay eager: graph breaks, not retraces
    if torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT:
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    seen: set[int] = set()
    count = 0
    for entry, root in modules.items():
        for path, m in root.named_modules():
            kwargs = region_kwargs(m)
            if kwargs is None or id(m) in seen:
                continue
            seen.add(id(m))
            params = list(m.parameters())
            if m._compiled_call_impl is not None or not any(p.requires_grad for p in params):
                continue
            m.compile(**kwargs)
            m._compiled_call_impl = _explained(m._compiled_call_impl, f"{entry}.{path} ({type(m).__name__})")
            count += 1
    return count
