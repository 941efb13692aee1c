"""The run's plumbing around the composition in ``train.py``: the recipe loader, one optimizer
step, checkpoints, metrics and logs, faults and preemption, profiling, ``--dry_run``'s memory
estimate. The top of the tree: nothing below imports it.
"""
