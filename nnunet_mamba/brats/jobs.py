"""The job runner of ``nnmamba brats2023 reproduce``: nnU-Net commands, one per device slot at a time."""
from __future__ import annotations

import datetime
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from ..nnunet.commands import run_command

if TYPE_CHECKING:  # annotations only: steps imports this module
    from .steps import PredictionSet


def device_slots(device: str, gpus: int | None, dry_run: bool = False, environ=os.environ) -> list:
    """GPU ids for ``CUDA_VISIBLE_DEVICES`` of the concurrent processes (``[None]`` on the CPU).

    On CUDA the ids are those visible to this process (``CUDA_VISIBLE_DEVICES`` if set);
    ``gpus`` (default: all of them) of them are used, one training at a time on each.
    """
    if device == "cpu":
        return [None]
    import torch

    visible = environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in visible.split(",") if v.strip()] if visible is not None else None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        if dry_run:
            return [str(i) for i in range(gpus or 1)]
        raise UserError("--device cuda but no CUDA GPU is visible to PyTorch: run on a GPU machine (check "
                        "nvidia-smi and CUDA_VISIBLE_DEVICES) or pass --device cpu (slow; for tests only)")
    ids = (ids or [str(i) for i in range(count)])[:count]
    n = len(ids) if gpus is None else gpus
    if n > len(ids):
        raise UserError(f"--gpus {n} but only {len(ids)} GPU(s) are visible ({', '.join(ids)}); pass --gpus "
                        f"{len(ids)} or fewer")
    return ids[:n]


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
    seconds: float | None = None
    slot: str | None = None
    error: str | None = None

    def shell(self) -> str:
        return " ".join(str(a) for a in self.argv)


class JobRunner:
    """Runs jobs with at most one per device slot at a time.

    ``slots`` are GPU ids (each job gets ``CUDA_VISIBLE_DEVICES=<id>``) or ``[None]`` (one job
    at a time, environment unchanged). Failures do not stop the other jobs; they are raised
    together at the end as one :class:`UserError` naming each log file.
    """

    def __init__(self, env: dict, slots: list):
        self.env = env
        self.slots = list(slots)

    def _run_one(self, job: Job, slot) -> None:
        env = dict(self.env)
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(slot)
        job.slot = slot
        where = f" on GPU {slot}" if slot is not None else ""
        print(f"[{job.name}]{where}: log {job.log}", flush=True)
        job.log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        try:
            with open(job.log, "a") as log:
                log.write(f"\n# {datetime.datetime.now().isoformat(timespec='seconds')} "
                          f"CUDA_VISIBLE_DEVICES={slot}\n$ {job.shell()}\n")
                log.flush()
                run_command([str(a) for a in job.argv], env, log)
        except UserError as e:
            job.error = str(e)
        except OSError as e:
            job.error = f"could not run {job.argv[0]}: {e} (log: {job.log})"
        job.seconds = time.time() - t0

    def run(self, jobs: list) -> None:
        if len(self.slots) == 1 or len(jobs) <= 1:
            for job in jobs:
                self._run_one(job, self.slots[0])
        else:
            free = queue.Queue()
            for s in self.slots:
                free.put(s)

            def worker(job):
                slot = free.get()
                try:
                    self._run_one(job, slot)
                finally:
                    free.put(slot)

            threads = [threading.Thread(target=worker, args=(j,), daemon=True) for j in jobs]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        failed = [j for j in jobs if j.error]
        if failed:
            raise UserError(f"{len(failed)} of {len(jobs)} command(s) failed; the others finished (rerun the same "
                            "command to resume):\n  " +
                            "\n  ".join(f"{j.name}: {j.error}" for j in failed))
