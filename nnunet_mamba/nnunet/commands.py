"""Running nnU-Net's commands (``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train``, ...).

:func:`nnunet_env` and :func:`command_environment` give the environment of the commands,
:func:`run_command` runs one, its output in a log file or on the console.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Callable, Optional

from ..errors import UserError
from .folders import NnUNetFolders

#: settings of nnU-Net's own that a user's environment may set and the commands must keep
USER_SETTINGS = ("nnUNet_compile", "nnUNet_n_proc_DA", "nnUNet_def_n_proc")


def nnunet_env(workdir: Path) -> dict[str, str]:
    """This process's environment with nnU-Net's folders inside ``workdir``.

    Two augmentation and export workers unless set by the user, ``nnUNet_compile`` false,
    unbuffered Python output (nnU-Net's per-epoch lines arrive as they are printed).
    """
    env = dict(os.environ)
    env.update(NnUNetFolders.in_workdir(workdir).as_env())
    env.update({
        "nnUNet_n_proc_DA": env.get("nnUNet_n_proc_DA", "2"),
        "nnUNet_def_n_proc": env.get("nnUNet_def_n_proc", "2"),
        "nnUNet_compile": "false",
        "PYTHONUNBUFFERED": "1",
    })
    return env


def command_environment(folders: NnUNetFolders, work: Path | None, device: str, parallel: int,
                        environ=os.environ) -> dict:
    """Environment of nnU-Net commands of which ``parallel`` run at once.

    ``nnUNet_*`` folders from ``folders``; ``nnUNet_compile`` false unless set by the user
    (the Mamba trainers' selective scan is not meant to be traced). Data-augmentation workers
    (``nnUNet_n_proc_DA``), unless set by the user: 2 on the CPU, on CUDA the CPU cores shared
    by the ``parallel`` trainings (2-12 each).
    """
    env = nnunet_env(Path(work).resolve()) if work is not None else dict(environ)
    if work is None:
        env.setdefault("nnUNet_n_proc_DA", "2")
        env.setdefault("nnUNet_def_n_proc", "2")
        env.setdefault("nnUNet_compile", "false")
    env.update(folders.as_env())
    for key in USER_SETTINGS:
        if key in environ:
            env[key] = environ[key]
    if device == "cuda":
        cores = os.cpu_count() or 2
        if "nnUNet_n_proc_DA" not in environ:
            env["nnUNet_n_proc_DA"] = str(max(2, min(12, cores // max(1, parallel))))
        if "nnUNet_def_n_proc" not in environ:
            env["nnUNet_def_n_proc"] = str(max(2, min(8, cores // max(1, parallel))))
    return env


def run_command(cmd: list[str], env: dict[str, str], log=None,
                on_line: Optional[Callable[[str], None]] = None) -> None:
    """Run an nnU-Net command (from this Python's bin folder), failing loudly.

    Its output goes line by line to ``log`` (an open file) and to ``on_line``; without a
    log it goes to the console. On failure the last lines are shown with the log's path.
    """
    exe = Path(sys.executable).parent / cmd[0]
    full = [str(exe) if exe.exists() else cmd[0], *cmd[1:]]
    t0 = time.time()
    print(f"$ {' '.join(cmd)}", flush=True)
    if log is None:
        proc = subprocess.run(full, env=env)
        tail: deque = deque()
    else:
        tail = deque(maxlen=25)
        with subprocess.Popen(full, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, bufsize=1, errors="replace") as proc:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                tail.append(line.rstrip("\n"))
                if on_line is not None:
                    on_line(line.rstrip("\n"))
    if proc.returncode != 0:
        where = f" (full output: {log.name})" if log is not None else ""
        shown = "\n".join(f"  | {t}" for t in tail)
        raise UserError(f"command failed with exit code {proc.returncode}: {' '.join(cmd)}"
                        f"{where}" + (f"\nlast lines:\n{shown}" if shown else ""))
    print(f"  done in {time.time() - t0:.0f} s", flush=True)
