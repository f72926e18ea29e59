"""Linear layers on oneDNN-packed weights for the inference passes of a float32 model on a CPU.

A decoding step multiplies a few rows (one per answer being generated) by every weight matrix, and PyTorch's
default float32 matmul handles such thin products poorly on a CPU. `packed_linears(model)` makes a copy of each
`nn.Linear` weight in oneDNN's own layout (`to_mkldnn`) once for a whole pass and runs the layer on it. On the
2-core fp32 CPU, with the default model and the output head packed too: a decoding step of 3 rows took 0.16 s
instead of 0.43 s, of 48 rows 0.51 s instead of 0.78 s; 32 eval prompts with 128-token answers in batches of 16
took 67.8 s instead of 111.8 s, with the same answers. A prompt pass over many tokens ran about 5 % slower packed
(48 prompts of 60 tokens: 17.7-18.5 s against 16.9-17.2 s), so passes that only run prompts (KL references,
capability, healing's precomputation, a direction pass without answers) stay dense.

Only each module's `forward` changes during the pass: the modules, their parameters and their hooks (a live edit,
healing's corrections, the activation recorder) stay, and so do the dense weights. A model loaded from
safetensors keeps them in the file's memory map, so dropping them would save nothing and restoring them would add
a private copy. The packed copies are extra memory for the pass and are freed, with the heap trimmed, when it ends;
where the machine has less than 1.5 times their size free, the pass runs on the dense weights. Weights must not
change inside a pass (the copy would not see it). The output head is packed too, also when it is tied to the
input embedding (the embedding keeps reading the dense weight): on the default abliteration, re-run on its cache,
that took 268.1 s instead of 288.1 s at a peak RSS of 5.2 GB instead of 4.7 GB. Never packed: a weight that two
linear layers share (it would be copied twice), modules on another device or dtype, subclasses of `nn.Linear`
(quantized or adapter layers), modules whose `forward` was already replaced. `DECCP_PACKED_LINEARS=0` turns it off.
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
    """Storage addresses of weights that more than one linear layer holds (each would get its own copy)."""
    seen: dict[int, int] = {}
    for mod in model.modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        for p in mod.parameters(recurse=False):
            seen[p.data_ptr()] = seen.get(p.data_ptr(), 0) + 1
    return {ptr for ptr, n in seen.items() if n > 1}


def _available_memory() -> int | None:
    """Bytes the kernel reports as available (Linux), None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def packed_linears(model):
    """Run the body (an inference pass, under `torch.no_grad`) with `model`'s linear layers on packed copies of
    their weights; every module is as it was when it ends, also on an error. Nested use packs nothing more."""
    from deccp.models import release_memory

    swapped: list[torch.nn.Linear] = []
    with torch.no_grad():
        try:
            if enabled():
                shared = _shared_storages(model)
                mods = [m for m in model.modules() if _packable(m, shared)]
                need, free = sum(m.weight.numel() * 4 for m in mods), _available_memory()
                if free is not None and need * 1.5 > free:
                    logger.info("packed linears: %.1f GB needed, %.1f GB available; running on the dense weights",
                                need / 1e9, free / 1e9)
                    mods = []
                for mod in mods:
                    bias = mod.bias.detach() if mod.bias is not None else torch.zeros(mod.out_features)
                    mod.forward = _packed_forward(mod.weight.detach().to_mkldnn(), bias.to_mkldnn(), mod.out_features)
                    swapped.append(mod)
            yield model
        finally:
            for mod in swapped:
                del mod.forward
            if swapped:
                release_memory()
