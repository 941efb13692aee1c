"""Predicting a run before it starts, and the choices made from the prediction.

Everything here works from the recipe and the layout alone: no device, no process group.
``train.py`` asks it for the pipeline plan, ``--dry_run`` for the whole report, and
``parallelisms/`` applies what it decided.

- ``batch.py``: the global batch and its micro-steps.
- ``cost.py``: predicted compute time of a stage's pieces (FLOPs or bytes over the rates measured
  per GPU kind, ``rates/<kind>.json``); ``gpu.py``: which table, and what memory, a run plans for.
- ``comm.py``: predicted time of the pipeline's sends and FSDP's collectives (bytes over stated rates).
- ``memory.py``: predicted peak memory of every pipeline rank; the memory constraint of a split.
- ``split.py``: the contiguous layer split that balances the ranks' predicted time.
- ``replay.py``: torch's schedule action lists replayed with predicted times (makespan, bubble).
- ``pipeline_plan.py``: one candidate plan (schedule, stages, microbatches), checked and split.
- ``timing.py``: a plan's predicted step per rank and its bubble (the run log's line).
- ``schedule_search.py``: the recipe's plan: the "auto" schedule, stages per rank and microbatch size.
- ``dry_run.py``: ``train.py --dry_run``'s flags and report.

Imports ``config``, ``models``, ``parallelisms`` and ``losses``; only ``training`` and
``train.py`` import it.
"""
