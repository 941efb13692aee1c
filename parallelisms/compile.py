"""Per-block ``torch.compile``, applied before FSDP as TorchTitan does.

``Module.compile()`` compiles in place, so parameter names (and with them
initialization and checkpoints) are the same compiled or not.
"""

from models.transformer import Transformer


def apply_compile(model: Transformer) -> None:
    for block in model.layers.values():
        block.compile(fullgraph=True)
