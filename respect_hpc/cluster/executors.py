"""submitit executors for a manifest's stages: ``local`` (this machine), ``slurm`` (a cluster), ``debug``.

The launch code knows resources, not models: a stage's resources come from the
manifest's ``cluster.stages`` section, whose strings were validated when the
manifest was loaded, and become submitit parameters, never shell text.
"""

from __future__ import annotations

import submitit

from respect_hpc.config.schema import Manifest
from respect_hpc.core.rundir import RunDir


def executor(manifest: Manifest, stage: str, executor_kind: str | None = None) -> submitit.Executor:
    """An executor for ``stage``'s array tasks, with the manifest's resources for that stage."""
    kind = executor_kind or manifest.cluster.executor
    folder = RunDir.of(manifest).make_private() / "logs" / stage / "%j"
    resources = manifest.cluster.stages[stage]
    if kind == "debug":
        return submitit.DebugExecutor(folder=folder)
    if kind == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=resources.time_min, gpus_per_node=resources.gpus,
                             cpus_per_task=resources.cpus, tasks_per_node=resources.processes)
        return ex
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=3)
    cluster = manifest.cluster
    extra = {k: v for k, v in (("account", cluster.account), ("qos", cluster.qos),
                               ("constraint", cluster.constraint)) if v is not None}
    ex.update_parameters(
        job_name=f"{manifest.experiment}-r{manifest.round}-{stage}", time=resources.time_min,
        cpus_per_task=resources.cpus, mem=f"{resources.mem_gb}G", nodes=resources.nodes,
        ntasks_per_node=resources.processes,
        signal_delay_s=120, **({"partition": cluster.partition} if cluster.partition else {}),
        **({"gpus_per_node": resources.gpus} if resources.gpus else {}),
        **({"array_parallelism": resources.max_parallel} if resources.max_parallel else {}),
        **extra)
    return ex
