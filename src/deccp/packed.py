"""Linear layers on oneDNN-packed weights for the inference passes of a float32 model on a CPU.

A decoding step multiplies a few rows (one per answer being generated) by every weight matrix. PyTorch's
default float32 matmul on a CPU re-lays the weight out for every such call, so a step costs far more than reading
the weights. `packed_linears(model)` converts each `nn.Linear` weight to oneDNN's own layout (`to_mkldnn`) once
for a whole pass and back after it, bit for bit. On the 2-core fp32 CPU, with the default model: a decoding step
of 3 rows took 0.16 s instead of 0.43 s, of 48 rows 0.51 s instead of 0.78 s; 32 eval prompts with 128-token
answers in batches of 16 took 67.8 s instead of 111.8 s, with the same answers. Prompt passes over many tokens
gain nothing (about as fast either way), so passes that only run prompts are left as they are.

What changes during the pass is only each module's `forward`: the module objects, their parameters, their hooks
(a live edit, healing's corrections, the activation recorder) stay where they are. The dense weight is not kept
beside the packed one (that would double the model's memory): inside the pass `module.weight` is an empty tensor,
so code that reads it there fails instead of computing with something stale. Skipped: modules on another device
or dtype, subclasses of `nn.Linear` (quantized or adapter layers), weights shared with another parameter (a tied
output head), modules whose `forward` was already replaced. `DECCP_PACKED_LINEARS=0` turns it off.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os

import torch

logger = logging.getLogger(__name__)

ENV = "DECCP_PACKED_LINEARS"


@functools.cache
def _backend_works() -> bool:
    """oneDNN's linear is there and agrees with `F.linear` on a small example (checked once per process)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=gen) for s in ((3, 5, 16), (8, 16), (8,)))
        with torch.no_grad():
            got = _packed_forward(w.to_mkldnn(), b.to_mkldnn(), 8)(x)
        return bool(torch.allclose(got, torch.nn.functional.linear(x, w, b), atol=1e-4))
    except (AttributeError, RuntimeError, NotImplementedError) as e:  # a build without oneDNN, or the op gone
        logger.info("packed linears unavailable (%s); inference runs on the dense weights", e)
        return False


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0" and _backend_works()


def _packed_forward(weight, bias, out_features: int):
    def forward(x):
        lead = x.shape[:-1]
        y = torch.ops.aten.mkldnn_linear(x.reshape(-1, x.shape[-1]).contiguous().to_mkldnn(), weight, bias)
        return y.to_dense().reshape(*lead, out_features)
    return forward


def _packable(module, shared: set[int]) -> bool:
    if type(module) is not torch.nn.Linear:
        return False
    w = module.weight
    return ("forward" not in module.__dict__ and w.device.type == "cpu"
            and w.dtype == torch.float32 and w.numel() > 0 and w.data_ptr() not in shared
            and not hasattr(module, "_hf_hook"))  # accelerate's offload hooks move weights in and out


def _shared_storages(model) -> set[int]:
    """Storage addresses of parameters that more than one module holds (tied embeddings)."""
    seen: dict[int, int] = {}
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            seen[p.data_ptr()] = seen.get(p.data_ptr(), 0) + 1
    return {ptr for ptr, n in seen.items() if n > 1}


@contextlib.contextmanager
def packed_linears(model):
    """Run the body (an inference pass, under `torch.no_grad`) with `model`'s linear layers on packed weights;
    every weight is back, unchanged, when it ends, also on an error. Nested use packs nothing more."""
    swapped: list[tuple[torch.nn.Linear, torch.Tensor]] = []
    with torch.no_grad():
        try:
            if enabled():
                shared = _shared_storages(model)
                for mod in model.modules():
                    if not _packable(mod, shared):
                        continue
                    packed = mod.weight.detach().to_mkldnn()
                    bias = (mod.bias.detach() if mod.bias is not None else torch.zeros(mod.out_features)).to_mkldnn()
                    mod.forward = _packed_forward(packed, bias, mod.out_features)
                    swapped.append((mod, packed))
                    mod.weight.data = torch.empty(0, dtype=torch.float32)
            yield model
        finally:
            for mod, packed in swapped:
                mod.weight.data = packed.to_dense()
                del mod.forward
