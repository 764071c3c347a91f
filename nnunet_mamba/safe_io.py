"""Writing outputs without losing anything: checks before computing, atomic writes, cleanup.

Every command that writes files goes through these helpers:

* :func:`check_output_file` / :func:`check_output_dir` run *before* any computing: an
  existing path of the wrong kind (a folder where a file is written, a file or a symlink
  where a folder is), existing outputs without ``--overwrite``, and outputs that are one
  of the command's inputs (refused even with ``--overwrite``) are :class:`UserError`\\ s.
* :func:`atomic_write_text` / :func:`atomic_open` write ``.<name>.tmp-<pid>`` in the
  target folder and rename it into place: a reader sees the old or the new file, never a
  half-written one, and a symlink planted at the target is replaced, never followed
  (``O_NOFOLLOW`` on the temporary file, ``rename`` on the link). Without ``overwrite`` the
  rename is a hard link that fails if the target appeared meanwhile.
* :func:`remove_stale` deletes ``.<name>.incomplete-<pid>`` / ``.old-<pid>`` /
  ``.tmp-<pid>`` entries left by killed runs (their process no longer exists).
* :func:`load_json` refuses duplicate keys; :func:`confined` keeps paths read from a model
  folder inside that folder.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Optional

from .errors import UserError

_STALE = re.compile(r"^\..+\.(incomplete|old|tmp)-(\d+)$")


def _same(a: Path, b: Path) -> bool:
    try:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _kind(path: Path) -> Optional[str]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    return "folder" if stat.S_ISDIR(st.st_mode) else "file"


def check_output_file(path, overwrite: bool, inputs: Iterable = (), option: str = "--out") -> Path:
    """Refuse (UserError) an output file that exists without ``overwrite``, is a folder, or
    is one of ``inputs``; checked before computing. Returns the path."""
    path = Path(path)
    for inp in inputs:
        if inp is not None and _same(path, Path(inp)):
            raise UserError(f"{option} {path} is an input of this command ({inp}); write the output "
                            "to another file (an input is never overwritten, not even with --overwrite)")
    kind = _kind(path)
    if kind == "folder" or (kind == "symlink" and path.is_dir()):
        raise UserError(f"{option} {path} is an existing folder; name the output file, e.g. "
                        f"{path / 'predictions.csv'}")
    if kind is not None and not overwrite:
        raise UserError(f"{option} {path} already exists; pass --overwrite to replace it or choose "
                        "another file")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{option} {path}: {parent} is a file, not a folder; choose another path")
    remove_stale(parent)  # temporary files of killed runs
    return path


def check_output_dir(path, overwrite: bool, names: Iterable[str] = (), inputs: Iterable = (),
                     option: str = "--out") -> Path:
    """Refuse (UserError) an output folder that is a file or a symlink, is (or lies in) one of
    the ``inputs`` folders, or already holds one of ``names`` without ``overwrite``."""
    path = Path(path)
    kind = _kind(path)
    if kind == "file":
        raise UserError(f"{option} {path} is an existing file; pass a folder")
    if kind == "symlink":
        raise UserError(f"{option} {path} is a symlink (to {os.readlink(path)}); outputs are not written "
                        "through symlinks: pass the real folder")
    real = os.path.realpath(path)
    for inp in inputs:
        if inp is None:
            continue
        r = os.path.realpath(inp)
        if real == r or (Path(inp).is_file() and os.path.dirname(r) == real and Path(inp).name in set(names)):
            raise UserError(f"{option} {path} is an input of this command ({inp}); write to another folder")
    if kind is not None and not overwrite:
        present = [n for n in names if _kind(path / n) is not None]
        if present:
            more = f" (and {len(present) - 1} more)" if len(present) > 1 else ""
            raise UserError(f"{option} {path} already holds {present[0]}{more}; pass --overwrite to replace "
                            "the outputs or choose another folder")
    if kind is not None:
        for n in names:
            if _kind(path / n) == "folder":
                raise UserError(f"{path / n} is a folder where an output file is written; move it away")
        remove_stale(path)  # temporary files of killed runs
    return path


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    if _kind(path) == "folder":
        raise UserError(f"{path} is a folder where an output file is written; move it away")
    if overwrite:
        os.replace(tmp, path)  # replaces a symlink at path, never writes through it
        return
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise UserError(f"{path} already exists; pass --overwrite to replace it") from None
    except OSError:  # file systems without hard links
        if _kind(path) is not None:
            raise UserError(f"{path} already exists; pass --overwrite to replace it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


@contextmanager
def atomic_open(path, mode: str = "w", overwrite: bool = False, **kwargs):
    """``open()`` on a temporary file next to ``path``, renamed onto ``path`` on success
    (removed on failure). Text modes default to UTF-8."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and _kind(path) is not None:
        raise UserError(f"{path} already exists; pass --overwrite to replace it")
    tmp = _tmp_name(path)
    if _kind(tmp) is not None:
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
    try:
        with os.fdopen(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path, overwrite)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path, text: str, overwrite: bool = False) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename (see the module doc)."""
    with atomic_open(path, "w", overwrite=overwrite) as f:
        f.write(text)
    return Path(path)


def write_json(path, content, overwrite: bool = False) -> Path:
    return atomic_write_text(path, json.dumps(content, indent=2) + "\n", overwrite=overwrite)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a leftover of an earlier process that had our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(folder) -> list[Path]:
    """Delete ``.<name>.incomplete-<pid>``, ``.old-<pid>`` and ``.tmp-<pid>`` entries of
    ``folder`` whose process is gone (left by killed runs); returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in os.scandir(folder):
        m = _STALE.match(entry.name)
        if not m or _alive(int(m.group(2))):
            continue
        p = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _no_duplicates(path):
    def hook(pairs):
        seen = {}
        for k, v in pairs:
            if k in seen:
                raise UserError(f"{path}: key {k!r} appears twice in one JSON object; keep one (which one "
                                "is meant cannot be guessed)")
            seen[k] = v
        return seen
    return hook


def load_json(path, fix: str = "fix the file") -> object:
    """``json.load`` that refuses duplicate keys and names the file on any error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a readable JSON file ({e}); {fix}") from None


def confined(folder, relative, what: str = "path") -> Path:
    """``folder / relative`` resolved, refused (UserError) unless it stays inside ``folder``
    (no absolute paths, no ``..`` or symlinks leading out)."""
    folder = Path(folder)
    rel = str(relative)
    root = os.path.realpath(folder)
    target = os.path.realpath(os.path.join(root, rel))
    if os.path.isabs(rel) or os.path.commonpath([root, target]) != root:
        raise UserError(f"{folder}: the {what} {rel!r} points outside the model folder; a model folder "
                        "only refers to its own files (was it edited or downloaded from an untrusted "
                        "source?). Restore the file from 'nnmamba ... train'")
    return Path(target)
