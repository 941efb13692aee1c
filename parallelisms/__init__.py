"""How the model is spread over ranks. Imports ``config`` and ``models`` only.

Where to look:
- ``parallel_dims.py``: degrees from the recipe, validated, and the named DeviceMesh.
- ``distributed.py``: process-group start-up, timeouts and the orderly shutdown.
- ``pipeline.py``: the stages a pipeline plan names (``planning/pipeline_plan.py`` decides it)
  and the schedule that runs them.
- ``parallelize.py``: what is applied to each model part, in order: AC, compile, the
  vocab-parallel head, FSDP (``activation_checkpoint.py``, ``compile.py``,
  ``vocab_parallel.py``, ``fsdp.py``).
- ``vocab_parallel.py``: where the classifier is sharded by vocabulary, the hidden-state
  gather that goes with it, and its gradient's completion.
- ``tied_embeddings.py``: the embedding/head tie across the first and last stage.
- ``grad_clip.py``: the whole model's gradient norm across shards and stages.
"""
