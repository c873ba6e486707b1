"""Parameter counts of any ``nn.Module``, grouped by component."""

from __future__ import annotations

from torch import nn


def _component(name: str) -> str:
    """``blocks.3.attn.qkv.weight`` -> ``blocks.*.attn``; ``embed.weight`` -> ``embed``.

    Indices of module lists are collapsed to ``*`` and the path is cut one level below the first
    index; names without an index keep their owning module's path.
    """
    parts = name.split(".")
    modules = parts[:-1] or parts
    for i, part in enumerate(modules):
        if part.isdigit():
            head = [("*" if p.isdigit() else p) for p in modules[: i + 2]]
            return ".".join(head)
    return ".".join(modules)


def parameter_table(model: nn.Module) -> list[tuple[str, int]]:
    """``[(component, parameter count), ...]`` in module order; sums to :func:`count_parameters`.

    A parameter shared by several modules (tied embeddings) is counted once, under the first
    name it appears with.
    """
    table: dict[str, int] = {}
    # named_parameters() yields each shared Parameter once.
    for name, param in model.named_parameters():
        key = _component(name)
        table[key] = table.get(key, 0) + param.numel()
    return list(table.items())


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameter elements (tied parameters once); optionally trainable only."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
