"""How ``nnmamba brats2023 reproduce`` runs its nnU-Net commands: jobs through submitit.

Each command is a :class:`Job`. An executor (:class:`LocalJobs` or :class:`SlurmJobs`) hands
the jobs to `submitit <https://github.com/facebookincubator/submitit>`_, waits for all of them
and then reports every failure at once, each with its log:

- :class:`LocalJobs` (``--executor local``): submitit's ``LocalExecutor`` on this machine, with
  at most one job per slot at a time. Slots are GPU ids (each job gets its own
  ``CUDA_VISIBLE_DEVICES``) or, on the CPU, ``-j`` anonymous slots. submitit's
  ``LocalExecutor`` starts every submitted job at once, so the slot limit is kept here: a job
  is submitted when a slot is free.
- :class:`SlurmJobs` (``--executor slurm``): submitit's ``SlurmExecutor``; every job is
  submitted at once and Slurm decides where and when each runs (one job per fold, its own GPUs).

The job itself (:class:`CommandTask`, run by submitit in another process or on a node) runs
the command with :func:`~nnunet_mamba.nnunet.commands.run_command`, its output appended to the
job's log. It is checkpointable: when Slurm pre-empts it or its time runs out, submitit
requeues it, and a training then continues from its latest checkpoint with ``--c``.
"""
from __future__ import annotations

import datetime
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from ..nnunet.commands import run_command

if TYPE_CHECKING:  # annotations only: steps imports this module
    from .steps import PredictionSet

EXECUTORS = ("local", "slurm")
#: timeout of a local job (submitit's LocalExecutor kills a job after its timeout_min; default 2 min)
LOCAL_TIMEOUT_MIN = 60 * 24 * 365
#: Slurm sends USR2 this long before the time limit; submitit then requeues the job
SIGNAL_DELAY_S = 120
_CHECKPOINTS = ("checkpoint_latest.pth", "checkpoint_best.pth")


def device_slots(device: str, gpus: int | None, dry_run: bool = False, environ=os.environ, cpu_jobs: int = 1) -> list:
    """GPU ids for ``CUDA_VISIBLE_DEVICES`` of the concurrent processes (``cpu_jobs`` x ``None`` on the CPU).

    On CUDA the ids are those visible to this process (``CUDA_VISIBLE_DEVICES`` if set);
    ``gpus`` (default: all of them) of them are used, one training at a time on each.
    """
    if device == "cpu":
        return [None] * max(1, cpu_jobs)
    import torch

    visible = environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible is not None else None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        if dry_run:
            return [str(i) for i in range(gpus or 1)]
        raise UserError("--device cuda but no CUDA GPU is visible to PyTorch: run on a GPU machine (check "
                        "nvidia-smi and CUDA_VISIBLE_DEVICES), use --executor slurm, or pass --device cpu (slow; "
                        "for tests only)")
    ids = (ids or [str(i) for i in range(count)])[:count]
    n = len(ids) if gpus is None else gpus
    if n > len(ids):
        raise UserError(f"--gpus {n} but only {len(ids)} GPU(s) are visible ({', '.join(ids)}); pass --gpus "
                        f"{len(ids)} or fewer")
    return ids[:n]


def parse_time(text: str) -> int:
    """``--time``: minutes (``720``) or ``HH:MM:SS`` (``12:00:00``) -> whole minutes (seconds round up)."""
    text = str(text).strip()
    if re.fullmatch(r"\d+", text):
        minutes = int(text)
    else:
        m = re.fullmatch(r"(\d+):([0-5]\d):([0-5]\d)", text)
        if not m:
            raise UserError(f"--time {text!r} is neither minutes (e.g. 720) nor HH:MM:SS (e.g. 12:00:00)")
        minutes = math.ceil((int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])) / 60)
    if minutes < 1:
        raise UserError(f"--time {text!r} is shorter than a minute")
    return minutes


@dataclass
class Job:
    """One nnU-Net command: its argv (console-script name first), log file and what it is."""

    name: str
    argv: list
    log: Path
    trainer: str | None = None
    fold: int | None = None
    resume: bool = False                   # a training continued with --c
    prediction: PredictionSet | None = None     # of a prediction job
    plans: str | None = None               # the plans identifier a training uses
    fold_folder: Path | None = None        # a training's output: --c is added when a checkpoint is there
    gpus: int = 1                          # GPUs of one job (Slurm; >1: nnU-Net's -num_gpus DDP)
    seconds: float | None = None
    slot: str | None = None
    job_id: str | None = None              # submitit's job id (the Slurm job id on a cluster)
    error: str | None = None

    def shell(self) -> str:
        return " ".join(str(a) for a in self.argv)


class CommandTask:
    """What one submitit job runs: the job's command, its output appended to the job's log.

    ``env`` is the whole environment of the command (``merge_environ`` false: this machine) or
    what to set on top of the environment where the job runs (a Slurm node). Returns
    ``{"seconds", "error"}``; a failed command is an ``error``, not an exception, so that the
    other jobs go on. Requeued by submitit (pre-emption, time limit) with :meth:`checkpoint`.
    """

    def __init__(self, job: Job, env: dict, slot=None, merge_environ: bool = False):
        self.job, self.env, self.slot, self.merge_environ = job, dict(env), slot, merge_environ

    def argv(self) -> list:
        argv = [str(a) for a in self.job.argv]
        folder = self.job.fold_folder
        if folder is not None and "--c" not in argv and any((Path(folder) / c).is_file() for c in _CHECKPOINTS):
            argv.append("--c")  # requeued, or a checkpoint appeared since the job was made
        return argv

    def __call__(self) -> dict:
        env = dict(os.environ) if self.merge_environ else {}
        env.update(self.env)
        if self.slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.slot)
        argv, log_path = self.argv(), Path(self.job.log)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        t0, error = time.time(), None
        try:
            with open(log_path, "a") as log:
                log.write(f"\n# {datetime.datetime.now().isoformat(timespec='seconds')} "
                          f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')}\n$ {' '.join(argv)}\n")
                log.flush()
                run_command(argv, env, log)
        except UserError as e:
            error = str(e)
        except OSError as e:
            error = f"could not run {argv[0]}: {e} (log: {log_path})"
        return {"seconds": time.time() - t0, "error": error}

    def checkpoint(self, *args, **kwargs):
        """submitit calls this before a requeue: the same command again (``--c`` added by :meth:`argv`)."""
        import submitit

        return submitit.helpers.DelayedSubmission(CommandTask(self.job, self.env, self.slot, self.merge_environ))


class _Executor:
    """Submits jobs through submitit, ``len(slots)`` at a time (all at once without slots), and
    reports the failures together once every job has ended."""

    kind = ""
    poll_s = 0.5

    def __init__(self, env: dict, slots: list | None, folder: Path):
        self.env, self.slots, self.folder = dict(env), (list(slots) if slots is not None else None), Path(folder)
        self.full_env = dict(env)   # the commands' whole environment on this machine

    def executor(self, job: Job):
        raise NotImplementedError

    def task(self, job: Job, slot) -> CommandTask:
        raise NotImplementedError

    def _submit(self, job: Job, slot):
        job.slot, job.error, job.seconds = slot, None, None
        sj = self.executor(job).submit(self.task(job, slot))
        job.job_id = str(sj.job_id)
        where = f" on GPU {slot}" if slot is not None else ""
        print(f"[{job.name}]{where}: {self.kind} job {sj.job_id}, log {job.log}", flush=True)
        return sj

    def _collect(self, job: Job, sj) -> None:
        try:
            result = sj.result()
        except Exception as e:  # the job itself broke (killed, cancelled, not runnable): submitit's error
            lines = [line for line in str(e).strip().splitlines() if line.strip()]
            job.error = (f"{self.kind} job {sj.job_id} failed: {lines[-1] if lines else type(e).__name__} "
                         f"(submitit log: {sj.paths.stderr}; command log: {job.log})")
            return
        job.seconds, job.error = result["seconds"], result["error"]

    def run(self, jobs: list) -> None:
        if not jobs:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        free = list(range(len(self.slots))) if self.slots is not None else None
        pending, running = list(jobs), []   # running: (job, submitit job, slot index)
        try:
            while pending or running:
                while pending and (free is None or free):
                    i = free.pop(0) if free is not None else None
                    job = pending.pop(0)
                    running.append((job, self._submit(job, self.slots[i] if i is not None else None), i))
                still = []
                for job, sj, i in running:
                    if sj.done():
                        self._collect(job, sj)
                        if free is not None:
                            free.append(i)
                    else:
                        still.append((job, sj, i))
                if len(still) == len(running):
                    time.sleep(self.poll_s)
                running = still
        except BaseException:  # Ctrl-C or an error here: no job goes on without us
            for _, sj, _ in running:
                try:
                    sj.cancel(check=False)
                except Exception:
                    pass
            raise
        failed = [j for j in jobs if j.error]
        if failed:
            raise UserError(f"{len(failed)} of {len(jobs)} command(s) failed; the others finished (rerun the same "
                            "command to resume):\n  " +
                            "\n  ".join(f"{j.name}: {j.error}" for j in failed))

    def local(self, env: dict | None = None) -> LocalJobs:
        """One job at a time on this machine (planning and preprocessing), submitit's files in the same folder."""
        return LocalJobs(self.full_env if env is None else env, [None], self.folder)


class LocalJobs(_Executor):
    """``--executor local``: submitit's ``LocalExecutor``, at most one job per slot at a time.

    ``slots``: GPU ids (``CUDA_VISIBLE_DEVICES=<id>`` per job) or ``[None] * n`` (``n`` jobs at
    once, environment unchanged). ``env`` is the commands' whole environment, as on this machine.
    """

    kind = "local"

    def executor(self, job: Job):
        import submitit

        executor = submitit.LocalExecutor(folder=self.folder)
        # no GPU of submitit's choosing (CommandTask sets CUDA_VISIBLE_DEVICES to the job's slot), no time limit
        executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN, gpus_per_node=0)
        return executor

    def task(self, job: Job, slot) -> CommandTask:
        return CommandTask(job, self.env, slot, merge_environ=False)


class SlurmJobs(_Executor):
    """``--executor slurm``: one Slurm job per command (submitit's ``SlurmExecutor``), all submitted at once.

    Only what the run changes in the environment and the ``nnUNet_*`` folders and settings
    travel to the nodes; the rest of a job's environment is the node's (its ``CUDA_VISIBLE_DEVICES`` is
    Slurm's). A job gets ``job.gpus`` GPUs, ``cpus_per_gpu`` CPU cores per GPU, ``time_min``
    minutes and ``partition`` (default: the cluster's).
    """

    kind = "slurm"
    poll_s = 30.0

    def __init__(self, env: dict, folder: Path, time_min: int, partition: str | None = None,
                 cpus_per_gpu: int = 14, environ=os.environ):
        super().__init__({k: v for k, v in env.items() if environ.get(k) != v or k.startswith("nnUNet_")}, None,
                         folder)
        self.full_env = dict(env)
        self.time_min, self.partition, self.cpus_per_gpu = time_min, partition, cpus_per_gpu

    def parameters(self, job: Job) -> dict:
        params = {"job_name": f"nnmamba {job.name}", "time": self.time_min, "nodes": 1, "ntasks_per_node": 1,
                  "gpus_per_node": job.gpus, "cpus_per_task": self.cpus_per_gpu * job.gpus,
                  "signal_delay_s": SIGNAL_DELAY_S, "stderr_to_stdout": True}
        if self.partition:
            params["partition"] = self.partition
        return params

    @staticmethod
    def check_cluster() -> None:
        """Slurm's commands must be here (a login node), before any long step runs."""
        import shutil

        missing = [c for c in ("sbatch", "srun", "sacct") if shutil.which(c) is None]
        if missing:
            raise UserError(f"--executor slurm but {', '.join(missing)} not found on PATH: run the command on a "
                            "Slurm login node (or inside a Slurm job), or use --executor local")

    def executor(self, job: Job):
        import submitit

        executor = submitit.SlurmExecutor(folder=self.folder)
        executor.update_parameters(**self.parameters(job))
        return executor

    def task(self, job: Job, slot) -> CommandTask:
        return CommandTask(job, self.env, None, merge_environ=True)
