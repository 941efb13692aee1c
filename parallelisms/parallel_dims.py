"""Parallel degrees from the recipe, checked against the world size, and the device mesh."""

import logging
from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh

from config.errors import ConfigError
from config.job_config import Parallelism
from parallelisms.distributed import init_mesh

logger = logging.getLogger("train")


@dataclass(frozen=True)
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    world_size: int

    @classmethod
    def from_config(cls, p: Parallelism, world_size: int) -> "ParallelDims":
        """Resolve ``data_parallel_shard_degree = -1`` and check the product, before any allocation."""
        fixed = p.pipeline_parallel_degree * p.data_parallel_replicate_degree
        shard = p.data_parallel_shard_degree
        if shard == -1:
            if world_size % fixed:
                raise ConfigError(
                    "parallelism.pipeline_parallel_degree",
                    f"pipeline_parallel_degree ({p.pipeline_parallel_degree}) x data_parallel_replicate_degree "
                    f"({p.data_parallel_replicate_degree}) = {fixed} does not divide the world size {world_size}; "
                    "launch a multiple of it (torchrun --nproc_per_node) or change the degrees",
                )
            shard = world_size // fixed
        if fixed * shard != world_size:
            raise ConfigError(
                "parallelism.data_parallel_shard_degree",
                f"pp {p.pipeline_parallel_degree} x dp_replicate {p.data_parallel_replicate_degree} x dp_shard {shard} "
                f"= {fixed * shard} ranks, but the world size is {world_size}; "
                "set data_parallel_shard_degree = -1 to fill the remaining ranks",
            )
        if p.vocab_parallel and shard == 1:
            logger.warning(
                "parallelism.vocab_parallel: data_parallel_shard_degree is 1, so the classifier has no "
                "ranks to be sharded over; this run trains as without it (it needs dp_shard > 1)"
            )
        return cls(p.pipeline_parallel_degree, p.data_parallel_replicate_degree, shard, world_size)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def build_mesh(self, device_type: str) -> tuple[DeviceMesh, DeviceMesh]:
        """The mesh with dims ``pp``, ``dp_replicate``, ``dp_shard``, and the flattened
        data-parallel mesh ``dp`` (data loading, loss sums)."""
        mesh = init_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard), ("pp", "dp_replicate", "dp_shard"))
        return mesh, mesh["dp_replicate", "dp_shard"]._flatten("dp")

    def fsdp_mesh(self, mesh: DeviceMesh) -> DeviceMesh:
        """2-D (replicate, shard) mesh for HSDP, 1-D for plain FSDP."""
        return mesh["dp_replicate", "dp_shard"] if self.dp_replicate > 1 else mesh["dp_shard"]
