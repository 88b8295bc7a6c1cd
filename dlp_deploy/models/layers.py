"""Structural discovery: a model's stack of decoder blocks, their Linear layers, weights pruning cannot reach, and
the share of zeros."""
from __future__ import annotations

from torch import nn

from ..errors import UserError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks: the longest ModuleList of identical block types holding Linear layers
    (a depth-pruned stack may also hold replacement blocks, which declare STREAMLINE_REPLACEMENT)."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module if not getattr(m, "STREAMLINE_REPLACEMENT", False)}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best):
            best = module
    if best is None:
        raise UserError(f"{type(model).__name__}: no stack of decoder blocks with nn.Linear layers found; "
                        "only transformer decoders built from torch.nn.Linear are supported")
    return best


def linear_modules(block: nn.Module) -> dict[str, nn.Linear]:
    """Prunable linear modules of a decoder block, by qualified name within the block."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def prunable_modules(model: nn.Module) -> list[dict[str, nn.Linear]]:
    return [linear_modules(block) for block in decoder_layers(model)]


def unprunable_weights(block: nn.Module) -> dict[str, tuple[int, ...]]:
    """Weight matrices in a block that no nn.Linear holds (qualified parameter name -> shape): MoE experts stored
    as 3-D parameters (transformers 5's `experts.gate_up_proj` [E, 2I, H]), routers, custom projections. Pruning
    only sees nn.Linear, so these would stay dense while the reported sparsity counted the Linears alone.
    Norm scales and biases (1-D) are never pruned, so they are not listed."""
    found = {}
    for module_name, module in block.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.dim() >= 2:
                found[f"{module_name}.{name}" if module_name else name] = tuple(param.shape)
    return found


def check_prunable(model: nn.Module) -> None:
    """Refuse (one line) a model whose decoder blocks hold weights pruning cannot reach, before any work."""
    for index, block in enumerate(decoder_layers(model)):
        found = unprunable_weights(block)
        if not found:
            continue
        name, shape = next(((n, s) for n, s in found.items() if len(s) >= 3), next(iter(found.items())))
        module = name.rpartition(".")[0] or name
        why = ("MoE expert pruning is not supported" if len(shape) >= 3
               else "dlp-deploy prunes nn.Linear weights only")
        raise UserError(f"{type(model).__name__}: layer {index} module {module} holds {name} {list(shape)} outside "
                        f"nn.Linear ({why}); it would stay dense while the reported sparsity claimed the target, "
                        f"so prune a dense (non-MoE) model built from nn.Linear layers")


def model_sparsity(model: nn.Module) -> dict:
    """Parameter-weighted share of exact zeros over the decoder blocks' linear weights."""
    zeros = total = 0
    per_layer = []
    for mods in prunable_modules(model):
        z = sum(int((m.weight == 0).sum()) for m in mods.values())
        n = sum(m.weight.numel() for m in mods.values())
        per_layer.append(z / n)
        zeros, total = zeros + z, total + n
    return {"global_sparsity": zeros / total, "per_layer": per_layer, "params": total}
