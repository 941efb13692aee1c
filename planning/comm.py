"""Predicted time of what a step moves between GPUs: the stages' sends and the collectives.

Bytes over a link rate, like planning/cost.py's compute (work over a measured rate). The rates
are stated guesses for one node of NVLink-connected GPUs, not measurements (one GPU cannot
time them); a pipeline that crosses nodes moves its sends over the network, several times
slower. Under pipeline parallel FSDP gathers each stage's parameters once per step (before
its first forward) and reduce-scatters its gradients once (after its last backward);
planning/replay.py places both on the step's timeline.
"""

import math
from dataclasses import dataclass

from models.args import ModelArgs


@dataclass(frozen=True)
class LinkRates:
    p2p_gbs: float  # one pipeline send (a microbatch's activations or their gradient) between two GPUs
    # NCCL's all-gather and reduce-scatter, bytes each rank receives per second: FSDP's, and the
    # vocab-parallel head's gather of the hidden states and reduce-scatter of their gradient
    collective_gbs: float


# Guesses, not measured, for the H100 and the H200 alike (both NVLink 4, 450 GB/s each way): NCCL's
# all-gather and reduce-scatter reach about two thirds of it, a single 16 MiB send of
# torch.distributed.pipelining (batched isend/irecv, launched from the schedule's Python loop) about a third.
LINKS = LinkRates(p2p_gbs=150.0, collective_gbs=300.0)


def transfer_ms(a: ModelArgs, tokens: int, act_bytes: int, links: LinkRates = LINKS) -> float:
    """One microbatch's hidden states ``[tokens, dim]`` (or their gradient) from one stage to the next."""
    return 1e3 * tokens * a.dim * act_bytes / (links.p2p_gbs * 1e9)


def fsdp_ms(
    params: int, dp_shard: int, dp_replicate: int, param_bytes: int, reduce_bytes: int, links: LinkRates = LINKS
) -> tuple[float, float]:
    """(all-gather, reduction) of ``params`` FSDP-managed parameters, once per step.

    A ring all-gather (and reduce-scatter) brings each rank (n - 1) / n of the unsharded
    tensor; under HSDP the reduced shard is then all-reduced over the replicas, 2 (r - 1) / r
    of the shard."""
    shard_share = (dp_shard - 1) / dp_shard
    gather = shard_share * params * param_bytes
    reduce = (
        shard_share * params * reduce_bytes
        + 2 * (dp_replicate - 1) / dp_replicate * math.ceil(params / dp_shard) * reduce_bytes
    )
    per_ms = links.collective_gbs * 1e6
    return gather / per_ms, reduce / per_ms
