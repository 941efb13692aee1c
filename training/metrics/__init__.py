"""A run's figures: ``device`` measures them (MFU's peak FLOPs, peak memory, tokens/s), ``logger`` reports a
logged step on rank 0 (console line and writers), ``writers`` are where they go (``metrics.jsonl`` always,
TensorBoard, ``wandb_writer`` for Weights & Biases), ``records`` is the ``metrics.jsonl`` format and its reader.

Nothing is imported here: ``records`` stays free of torch for ``scripts/plot_metrics.py``.
"""
