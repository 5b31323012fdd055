"""The output folder (OUT) of a compile: checked against every input, built aside, put in place atomically.

Contract (rule 1 of the project: never delete, overwrite or write inside anything but OUT):
- `OutputFolder(out, force, models=..., files=..., folders=...)` validates before any work, exit 2 on:
  OUT equal to, containing or inside a model folder or another folder the compile uses (--dump); OUT
  equal to or containing an input file (--calib, --recipe). Paths are compared resolved (symlinks
  followed: also an OUT reached through a linked parent folder), with or without --force. OUT that is itself a
  symbolic link (to a folder, or dangling), or lies under a dangling link, is refused (`symlink_on_path`): it
  would be written at the link's target. OUT that exists needs --force, must be a folder, and --force only
  replaces a folder that is empty or a previous compile's output (`looks_like_output`): anything else is
  not ours to delete.
- `staging(adopt=None)` makes the temporary sibling `.OUT.tmp-PID` everything is written into, plus the
  owner lock file `.OUT.lock-PID` (JSON pid/host, flock-held while the process lives). On start it looks at
  the siblings of earlier runs: a temporary folder whose lock is free (its process is gone) on this host is
  removed, unless it holds a resume state (resume.py: a compile killed after a committed layer), which is
  kept and reported ("OUT: an interrupted compile at layer k of N can be resumed with --resume (or remove
  FOLDER)"), never reused without --resume; one without a lock file, or whose process still runs, is
  reported on stderr and left alone, as is one that is a symbolic link (never resumed: it would become OUT, written
  at its target); a previous OUT moved aside (`.OUT.old-PID`) is removed only when OUT
  exists again, else reported (it may be the user's only copy). When the block fails the temporary folder
  is removed (signals deferred, lock last), except that with `resume=True` a SIGINT/SIGTERM keeps a
  folder holding a resume state (lock file left, unlocked) and says how to continue.
- `find_resumable()` -> `Resumable` (the stale temporary folder with a resume state and the most layers
  done, its process gone, on this host) or None; `staging(adopt=that)` claims its lock (a second
  `--resume` of the same folder fails, exit 2) and renames it to this process's temporary folder.
  A full disk (ENOSPC / EDQUOT anywhere, including safetensors' and torch's writers, which do not raise
  OSError) becomes `DiskFullError`: one line naming OUT, exit 1, nothing left behind.
- `commit()` gives every file and folder the user's umask (safetensors writes 0600), then, with SIGINT and
  SIGTERM deferred: without --force, renames the temporary folder to OUT without replacing anything that
  appeared meanwhile (`renameat2(RENAME_NOREPLACE)`; fallback: `mkdir OUT` as the claim, then `rename` onto
  the empty folder): a second compile that finished first makes this one fail with exit 2, its OUT kept.
  With --force: `renameat2(RENAME_EXCHANGE)` swaps old and new OUT in one step, then the old tree (now
  under the temporary name) is deleted (fallback: old OUT renamed aside, new renamed in, old deleted). A
  complete new tree is never deleted, and OUT is never half deleted.
- `check_free_space(bytes)`: before work, DiskFullError when OUT's file system has less free space than a
  lower bound of what the compile writes (`estimate_output_bytes`).
Source of the rename flags: Linux renameat2(2) (RENAME_NOREPLACE = 1, RENAME_EXCHANGE = 2, since 3.15).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from . import knobs, resume
from .errors import DiskFullError, QCError
from .interrupts import deferred

#: files whose presence marks a folder as a previous qcompile output (driver, report.py, artifact.py)
OUTPUT_MARKERS = ("qcompile_report.json", "executable/model.json", "quant_model_description.json")
_DISK_FULL_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
#: messages of writers that do not raise OSError (safetensors' Rust writer: "No space left on device (os error 28)")
_DISK_FULL_TEXT = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
#: free bytes under which an unexplained write failure is blamed on a full disk (torch's zip writer says only
#: "unexpected pos ...")
_NEARLY_FULL = 1 << 20

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def resolved(path: Path) -> Path:
    """Absolute path with every existing symlink followed (the path need not exist)."""
    return Path(os.path.abspath(path)).resolve()


def symlink_on_path(path: Path) -> str | None:
    """Why `path` would be written where a link points, or None: its last component is a symbolic link (to a
    folder or dangling: writing "there" writes the link's target), or a folder on the way is a dangling link
    (creating the missing parents would create the target's). A parent that is a link to an existing folder is
    fine: the path names a place inside that folder."""
    p = Path(os.path.abspath(path))
    if p.is_symlink():
        return f"is a symbolic link (to {os.readlink(p)})"
    for parent in p.parents:
        if parent.is_symlink() and not parent.exists():
            return f"lies under {parent}, a symbolic link to {os.readlink(parent)}, which does not exist"
    return None


def _inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def looks_like_output(folder: Path) -> bool:
    """True for a folder a compile wrote (one of OUTPUT_MARKERS is there) or an empty one."""
    return not any(folder.iterdir()) or any((folder / m).is_file() for m in OUTPUT_MARKERS)


def user_umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(folder: Path, umask: int) -> None:
    """chmod every folder under `folder` (itself included) to 0777 & ~umask and every file to 0666 & ~umask,
    as if each had been created with plain open()/mkdir (some writers create 0600 files)."""
    dir_mode, file_mode = 0o777 & ~umask, 0o666 & ~umask

    def chmod(path: str, mode: int) -> None:
        if not os.path.islink(path):
            with contextlib.suppress(OSError):  # best effort: some file systems have no modes
                os.chmod(path, mode)
    chmod(str(folder), dir_mode)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            chmod(os.path.join(root, name), dir_mode)
        for name in files:
            chmod(os.path.join(root, name), file_mode)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """renameat2(2); False when the system or the file system does not offer it (caller falls back)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename folder `src` to `dst`, atomically failing with FileExistsError when `dst` exists."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    os.mkdir(dst)  # the claim: fails with FileExistsError if anything is there
    try:
        os.rename(src, dst)  # POSIX: a folder may replace an empty folder
    except BaseException:
        with contextlib.suppress(OSError):
            os.rmdir(dst)
        raise


def is_disk_full(exc: BaseException, folder: Path | None = None) -> str | None:
    """'no space left on device' / 'disk quota exceeded' when `exc` comes from a full disk, else None.

    OSError is read by errno; other writers' errors by their message; an error without either is blamed
    on the disk only when `folder`'s file system has less than 1 MiB free."""
    seen = set()
    while exc is not None and id(exc) not in seen:  # the error itself and its causes
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return _DISK_FULL_ERRNOS[exc.errno]
        text = str(exc).lower()
        for needle in _DISK_FULL_TEXT:
            if needle in text:
                return "disk quota exceeded" if "quota" in needle or "122" in needle else "no space left on device"
        exc = exc.__cause__ or exc.__context__
    if folder is not None and free_bytes(folder) < _NEARLY_FULL:
        return "no space left on device"
    return None


def free_bytes(path: Path) -> int:
    """Free bytes (for this user) on the file system holding `path` or its nearest existing parent."""
    p = resolved(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return 1 << 62


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class _OwnerLock:
    """`.OUT.lock-PID`: says which process owns `.OUT.tmp-PID` / `.OUT.old-PID`; flock-held while it lives."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.write(self._fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())

    def release(self, keep_file: bool = False) -> None:
        """Unlock; delete the lock file unless `keep_file` (a kept folder then reads as its process gone)."""
        if self._fd is not None:
            if not keep_file:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def owner_gone(path: Path) -> bool | None:
        """True: the lock file is there, free, and written on this host (its process ended); False: held;
        None: no lock file, unreadable, or another host's (cannot tell)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            except OSError:
                return None
            try:
                info = json.loads(os.read(fd, 4096) or b"{}")
            except ValueError:
                return None
            return True if info.get("host") == socket.gethostname() else None
        finally:
            os.close(fd)


@dataclass(frozen=True)
class Resumable:
    """A stopped compile's temporary folder holding a resume state, and its (free) owner lock file."""
    folder: Path
    lock: Path
    done: int      # layers done (-1: the manifest is unreadable; resume.load says why)
    total: int


class OutputFolder:
    """OUT of one compile; see the module docstring."""

    def __init__(self, out: Path, force: bool, models=(), files=(), folders=(), log=None, resume: bool = False,
                 option: str = "-o"):
        """`option`: the command-line option that named OUT, as every message here names it (`-o` for
        `qcompile MODEL`, `--save_path` / `--save_directory` for `qcompile quant`); `files`: (option as the user
        gave it, path) of the input files."""
        self.given = Path(out)
        self.option = option
        self.path = resolved(out)
        self.force = force
        self.resume = resume  # --resume: a SIGINT/SIGTERM keeps a resumable temporary folder
        self.log = log or (lambda msg: None)
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{os.getpid()}"
        self._lock_path = self.path.parent / f".{self.path.name}.lock-{os.getpid()}"
        self._lock: _OwnerLock | None = None
        self._committed = False
        self._check_inputs(models, files, folders)
        self._check_not_a_link()
        self._check_existing()

    # ------------------------------------------------------------------------------------------ validation

    def _check_inputs(self, models, files, folders) -> None:
        out, given, option_o = self.path, self.given, self.option
        for kind, items in (("the model folder", models), ("the --dump folder", folders)):
            for item in items:
                if item is None:
                    continue
                p = resolved(item)
                if _inside(out, p):
                    where = "is" if out == p else "lies inside"
                    raise QCError(f"output folder {given} {where} {kind} {item}: OUT must be a new folder outside "
                                  f"every input (it is written and replaced as a whole); choose another {option_o}")
                if _inside(p, out):
                    raise QCError(f"output folder {given} contains {kind} {item}: OUT must be a new folder outside "
                                  f"every input (it is written and replaced as a whole); choose another {option_o}")
        for option, item in files:
            if item is not None and _inside(resolved(item), out):
                raise QCError(f"output folder {given} contains the {option} file {item}: OUT must be a new folder "
                              f"outside every input (it is written and replaced as a whole); choose another {option_o}")

    def _check_not_a_link(self) -> None:
        """Rule 1: OUT is written and replaced where it is named, never at a link's target."""
        why = symlink_on_path(self.given)
        if why:
            raise QCError(f"output folder {self.given} {why}: {self.option} must name the folder itself, which "
                          f"qcompile writes and replaces as a whole, not a link to somewhere else; choose another "
                          f"{self.option}")

    def _check_existing(self) -> None:
        out, given = self.path, self.given
        if not (out.exists() or out.is_symlink()):
            return
        if not out.is_dir():
            raise QCError(f"output path {given} exists and is not a folder")
        if not self.force:
            raise QCError(f"output folder {given} already exists; choose another {self.option} or pass --force to "
                          "replace it")
        if not looks_like_output(out):
            raise QCError(f"output folder {given} exists and is not a qcompile output (none of "
                          f"{', '.join(OUTPUT_MARKERS)}): --force only replaces a previous compile's OUT; choose "
                          f"another {self.option} or remove it yourself")

    def check_free_space(self, needed: int) -> None:
        """DiskFullError when OUT's file system has fewer than `needed` free bytes (before any work)."""
        free = free_bytes(self.path.parent)
        if free < needed:
            raise DiskFullError(f"{self.given}: not enough free space on its device: the compile writes at least "
                                f"{_mib(needed)}, {_mib(free)} free")

    # ------------------------------------------------------------------------------------------- staging

    def _siblings(self) -> dict[str, dict[str, Path]]:
        """{pid: {"tmp" | "old" | "lock": path}} of what compiles of this OUT left beside it."""
        parent, stem = self.path.parent, f".{self.path.name}."
        entries = {}
        if not parent.is_dir():
            return entries
        for p in sorted(parent.iterdir()):
            kind, _, pid = p.name[len(stem):].partition("-") if p.name.startswith(stem) else ("", "", "")
            if kind in ("tmp", "old", "lock") and pid.isdigit():
                entries.setdefault(pid, {})[kind] = p
        return entries

    def find_resumable(self) -> Resumable | None:
        """The stopped compile of this OUT to resume (module docstring), or None."""
        found = []
        for pid, entry in self._siblings().items():
            tmp, lock = entry.get("tmp"), entry.get("lock")
            if (tmp and lock and tmp.is_dir() and not tmp.is_symlink() and resume.has_state(tmp)
                    and _OwnerLock.owner_gone(lock)):  # a link would be renamed to OUT: written at its target
                done, total = resume.describe(tmp) or (-1, -1)
                found.append((done, tmp.stat().st_mtime, Resumable(tmp, lock, done, total)))
        return max(found, key=lambda x: x[:2])[2] if found else None

    def _resumable_note(self, folder: Path) -> str:
        where = resume.describe(folder)
        if where is None:
            return (f"warning: {folder} holds the resume state of an interrupted compile of {self.given} that "
                    "cannot be read; remove it")
        return (f"{self.given}: an interrupted compile at layer {where[0]} of {where[1]} can be resumed with "
                f"--resume (or remove {folder})")

    def _clean_stale(self, adopt: Path | None = None) -> None:
        """Remove what stopped compiles of this OUT left behind; report what cannot be proven stale and
        what can be resumed (except `adopt`, the folder this compile resumes)."""
        for pid, found in self._siblings().items():
            lock = found.get("lock")
            gone = _OwnerLock.owner_gone(lock) if lock else None
            if gone is False:
                if "tmp" in found:
                    self.log(f"warning: {found['tmp']} belongs to a qcompile that is still running (pid {pid}): "
                             f"another compile of {self.given}? The one that finishes second fails without --force")
                continue
            if "tmp" in found:
                if found["tmp"] == adopt:
                    continue
                if found["tmp"].is_symlink():  # never ours: qcompile makes real folders (never resumed, removed)
                    self.log(f"warning: {found['tmp']} is a symbolic link, not a qcompile temporary folder; "
                             "left alone (remove it)")
                elif gone and resume.has_state(found["tmp"]):  # resumable: never removed, never reused silently
                    self.log(self._resumable_note(found["tmp"]))
                elif gone:
                    remove_tree(found["tmp"], None)
                    self.log(f"removed {found['tmp']}, left by a qcompile that was stopped")
                else:
                    self.log(f"warning: {found['tmp']} looks like the temporary folder of a stopped qcompile; "
                             f"remove it if no compile of {self.given} is running")
            if "old" in found:
                replaced = self.path.is_dir()  # the swap finished: the aside copy is garbage
                if gone and replaced:
                    remove_tree(found["old"], None)
                    self.log(f"removed {found['old']}, the previous {self.given} that a stopped "
                             "`qcompile --force` had already replaced")
                elif replaced:
                    self.log(f"warning: {found['old']} holds a previous {self.given} that a stopped "
                             "`qcompile --force` replaced; remove it")
                else:
                    self.log(f"warning: {found['old']} holds a previous {self.given} that a stopped "
                             f"`qcompile --force` moved aside; rename it back to {self.given} or remove it")
            if gone and lock and not any(p.exists() for k, p in found.items() if k != "lock"):
                with contextlib.suppress(OSError):
                    lock.unlink()

    @contextlib.contextmanager
    def staging(self, adopt: Resumable | None = None):
        """Yield the temporary folder (with `adopt`: that stopped compile's folder, renamed to ours); remove
        it (and map a full disk to DiskFullError) unless committed or kept for --resume."""
        self._clean_stale(adopt.folder if adopt else None)
        if adopt is None and self.tmp.is_dir() and resume.has_state(self.tmp):
            raise QCError(f"{self.tmp} (a stopped compile that had this process's id) holds a resume state: "
                          "rerun with --resume, or remove it")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = _OwnerLock(self._lock_path)
            if self.tmp.exists() and (adopt is None or adopt.folder != self.tmp):
                shutil.rmtree(self.tmp)  # a dead process had our pid: its folder is stale by definition
            if adopt is not None:
                self._take_over(adopt)
            else:
                self.tmp.mkdir()
        except QCError:
            self._lock.release()
            self._lock = None
            raise
        except OSError as e:
            self._discard()
            reason = is_disk_full(e)
            if reason:
                raise DiskFullError(f"{self.given}: {reason}") from None
            raise QCError(f"cannot create output folder {self.given} ({e.strerror or e})") from None
        try:
            knobs.test_pause("work")
            yield self.tmp
        except KeyboardInterrupt:
            if self.resume and resume.describe(self.tmp):
                self.log(self._resumable_note(self.tmp))
                self._lock.release(keep_file=True)
                self._lock = None
            raise
        except Exception as e:  # a QCError is never blamed on a nearly full disk, only on its own errno/text
            reason = is_disk_full(e, None if isinstance(e, QCError) else self.tmp)
            self._discard()
            if reason:
                where = f" (writing {e.filename})" if isinstance(e, OSError) and e.filename else ""
                raise DiskFullError(f"{self.given}: {reason}{where}; nothing was written") from None
            raise
        finally:
            self._discard()

    def _take_over(self, adopt: Resumable) -> None:
        """Claim `adopt`'s lock (held until its folder is ours) and rename its folder to ours."""
        if adopt.lock == self._lock_path:  # it had our pid: our own lock (taken above) is its lock
            return
        try:
            fd = os.open(adopt.lock, os.O_RDWR)
        except FileNotFoundError:
            raise QCError(f"--resume: another qcompile took over {adopt.folder}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise QCError(f"--resume: another qcompile is resuming {adopt.folder}") from None
            if not adopt.folder.is_dir():
                raise QCError(f"--resume: another qcompile took over {adopt.folder}")
            os.rename(adopt.folder, self.tmp)
            adopt.lock.unlink(missing_ok=True)
        finally:
            os.close(fd)

    def _discard(self) -> None:
        if self._committed or self._lock is None:
            return
        remove_tree(self.tmp, None)
        self._lock.release()
        self._lock = None

    # -------------------------------------------------------------------------------------------- commit

    def commit(self) -> None:
        """Put the temporary folder in place as OUT (see the module docstring)."""
        apply_umask(self.tmp, user_umask())
        with deferred():
            if not self.force:
                try:
                    rename_noreplace(self.tmp, self.path)
                except FileExistsError:
                    raise QCError(f"output folder {self.given} appeared while compiling (another compile of the same "
                                  "OUT?); it was left as it is and nothing was written; pass --force to replace "
                                  "it") from None
            else:
                self._replace()
            self._committed = True
            knobs.test_pause("replace")
            # after an exchange the temporary name holds the old OUT; the fallback moved it to .old-PID
            remove_tree(self.tmp, None)
            remove_tree(self._old_path, None)
            self._lock.release()
            self._lock = None

    @property
    def _old_path(self) -> Path:
        return self.path.parent / f".{self.path.name}.old-{os.getpid()}"

    def _replace(self) -> None:
        for _ in range(3):  # OUT may appear or vanish between the checks (another compile): retry the check
            if self.path.exists():
                if not (self.path.is_dir() and looks_like_output(self.path)):
                    raise QCError(f"output folder {self.given} was replaced by something that is not a qcompile "
                                  "output while compiling; it was left as it is")
                if _renameat2(self.tmp, self.path, _RENAME_EXCHANGE):
                    return
                os.rename(self.path, self._old_path)  # fallback: aside (reported on next start if we die here)
                try:
                    rename_noreplace(self.tmp, self.path)
                except BaseException:
                    os.rename(self._old_path, self.path)
                    raise
                return
            try:
                rename_noreplace(self.tmp, self.path)
                return
            except FileExistsError:
                continue
        raise QCError(f"output folder {self.given} kept changing while being replaced; nothing was replaced")


def remove_tree(folder: Path, lock: Path | None) -> None:
    """Delete `folder` (if there) and then its lock file, with SIGINT/SIGTERM deferred so the lock, which
    marks the folder as removable, is never deleted before the folder."""
    with deferred():
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder, ignore_errors=True)
        if lock is not None:
            with contextlib.suppress(OSError):
                lock.unlink()


def estimate_output_bytes(ckpt, passes, exclude=()) -> int:
    """A lower bound of the bytes a compile writes: every decoder Linear's weight at its scheme's bit width
    (float when no scheme claims it) plus the float embedding / lm_head, once: the executable graph reads
    these tensors from the artifact (executable.py, format v3). Scales, norms, reports and the ONNX model
    come on top."""
    from .passes.group_size import first_claim, model_linear_shapes
    float_bytes = ckpt.dtype.itemsize
    total = 0.0
    for name, (n, k) in model_linear_shapes(ckpt.config).items():
        owner = first_claim(passes, name, exclude)
        bits = owner.spec(0).weight.bits if owner is not None else 8 * float_bytes
        total += n * k * bits / 8
    head = int(ckpt.config["vocab_size"]) * int(ckpt.config["hidden_size"]) * float_bytes
    total += head * (1 if ckpt.tie_word_embeddings else 2)
    return int(total)

