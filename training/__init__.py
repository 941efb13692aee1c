"""The run's plumbing around the composition in ``train.py``: the recipe loader, one optimizer
step, validation, checkpoints, metrics and logs, faults and preemption, profiling. The top of
the tree: nothing below imports it (what predicts a run before it starts is ``planning/``).
"""
