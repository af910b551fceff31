"""submitit executors for a manifest's stages: ``local`` (this machine), ``slurm`` (a cluster), ``debug``.

The only place that makes submitit executors. A stage's resources come from the manifest's
``cluster.stages`` section, whose strings were validated when the manifest was loaded, and become submitit
parameters, never shell text; ``cluster.setup`` lines (one printable line each, checked when loaded) are the
only shell the manifest gives, run before each Slurm task as the user wrote them.
"""

from __future__ import annotations

import shlex
import sys

import submitit

from respect_hpc.config.schema import Manifest
from respect_hpc.core.errors import RespectError

EXECUTORS = ("local", "slurm", "debug")


class JobError(RespectError, RuntimeError):
    """A job that failed: its last error line and where its log is."""


def executor(manifest: Manifest, stage: str, executor_kind: str | None = None) -> submitit.Executor:
    """An executor for ``stage``'s array tasks, with the manifest's resources for that stage."""
    kind = executor_kind or manifest.cluster.executor
    manifest.run_dir.make_private()
    folder = manifest.run_dir.logs(stage) / "%j"
    resources = manifest.cluster.stages[stage]
    if kind == "debug":
        return submitit.DebugExecutor(folder=folder)
    if kind == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=resources.time_min, gpus_per_node=resources.gpus,
                             cpus_per_task=resources.cpus, tasks_per_node=resources.processes)
        return ex
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=3)
    ex.update_parameters(**slurm_parameters(manifest, stage))
    return ex


def slurm_parameters(manifest: Manifest, stage: str) -> dict:
    """The sbatch parameters of ``stage``'s arrays (submitit's names)."""
    cluster, resources = manifest.cluster, manifest.cluster.stages[stage]
    extra = {k: v for k, v in (("account", cluster.account), ("qos", cluster.qos),
                               ("constraint", cluster.constraint)) if v is not None}
    return dict(job_name=f"{manifest.experiment}-r{manifest.round}-{stage}", time=resources.time_min,
                cpus_per_task=resources.cpus, mem=f"{resources.mem_gb}G", nodes=resources.nodes,
                ntasks_per_node=resources.processes, signal_delay_s=120,
                **({"partition": cluster.partition} if cluster.partition else {}),
                **({"gpus_per_node": resources.gpus} if resources.gpus else {}),
                **({"array_parallelism": resources.max_parallel} if resources.max_parallel else {}),
                **({"setup": list(cluster.setup)} if cluster.setup else {}),
                **({"additional_parameters": dict(cluster.additional_parameters)}
                   if cluster.additional_parameters else {}),
                **({"mail_user": cluster.mail.user, "mail_type": ",".join(cluster.mail.types)} if cluster.mail else {}),
                **extra)


def sbatch_script(manifest: Manifest, stage: str, n_tasks: int) -> str:
    """The sbatch script of a stage's array as submitit writes it when it submits, rendered by submitit's own
    renderer without a Slurm installation (no executor is made, nothing is written; a unit test pins the
    renderer against a golden script, and the Slurm tests compare it with the script submitit submits)."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder = manifest.run_dir.logs(stage) / "%j"
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, map_count=n_tasks, **slurm_parameters(manifest, stage))


def run_jobs(manifest: Manifest, stage: str, executor_kind: str | None, call, arguments: list[tuple],
             report=print) -> list:
    """Run ``call(*args)`` for each of ``arguments`` as one array job of ``stage`` and wait; returns the
    results in order (a failed job raises :class:`JobError` with the job's last error line)."""
    ex = executor(manifest, stage, executor_kind)
    with ex.batch():
        submitted = [ex.submit(call, *args) for args in arguments]
    report(f"{stage}: {len(submitted)} job(s) {submitted[0].job_id.split('_')[0]} "
           f"({executor_kind or manifest.cluster.executor}); logs in {ex.folder.parent}")
    results = []
    for job in submitted:
        try:
            results.append(job.results()[0])  # one result per process; the first process's is the task's
        except submitit.core.utils.FailedJobError as exc:
            raise JobError(f"{stage} job {job.job_id} failed: {str(exc).strip().splitlines()[-1]} "
                           f"(log: {job.paths.stderr})") from None
    return results
