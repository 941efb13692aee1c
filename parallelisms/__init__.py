"""How the model is spread over ranks: mesh, FSDP2, pipeline stages, AC, compile.

Where to look:
- ``parallel_dims.py``: degrees from the recipe, validated, and the named DeviceMesh.
- ``pipeline.py``: where the model is split into stages and the schedule is built.
- ``fsdp.py``: which modules are sharded together, mixed precision.
- ``tied_embeddings.py``: the embedding/head tie across the first and last stage.
"""
