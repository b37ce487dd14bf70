"""The checkpoint file itself: an atomic, checksummed write and a verified read (used by tnlayers.training).

Format (version 2): the zip archive ``torch.save`` writes, whose zip comment (the archive's last bytes, which
zip readers, ``torch.load`` included, skip) is ``b"tnlayers-sha256:"`` and 64 hex digits: the SHA-256 of
every byte before the comment, taken with the comment-length field still 0. The file therefore stays a
plain ``torch.load(path, weights_only=True)`` file, and any flipped byte (zip headers, pickle, tensor data,
the digest itself) is caught before anything is restored. Version-1 files have no comment and load unchecked.

Writes go to ``.{name}.tmp-{host}-{pid}-{start}-{random}`` in the target's directory ({start}: the
process's start time where /proc tells it, else 0), are fsynced and renamed over the target. A save first
removes temporaries of the same target left by dead processes of this host (a process killed mid-save; a
restarted container whose new process got the same pid counts as dead, its start time differs); a
temporary whose process is alive, or from another host, is left alone.
"""
from __future__ import annotations

import errno
import hashlib
import hmac
import os
import pickle
import re
import secrets
import socket
import struct
from pathlib import Path
from typing import Any, BinaryIO, Dict, Optional

import torch

MAGIC = b"tnlayers-sha256:"
FOOTER_LEN = len(MAGIC) + 64
_EOCD_SIGNATURE = b"PK\x05\x06"  # zip end-of-central-directory record: 22 bytes, comment length last
_EOCD_LEN = 22
_CHUNK = 8 << 20


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _temp_pattern(path: Path) -> "re.Pattern[str]":
    return re.compile(rf"\.{re.escape(path.name)}\.tmp-([0-9a-f]{{8}})-(\d+)-(\d+)-[0-9a-f]+")


def _start_time(pid: int) -> str:
    """The process's start time (clock ticks after boot, Linux), "0" where unknown: with the pid, it names
    one process even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return "0"


def _writer_alive(pid: int, start: str) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows: assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        pass
    return start == "0" or _start_time(pid) in (start, "0")


def remove_stale_temps(path: Path) -> None:
    """Delete temporaries of ``path`` whose writer (a process of this host) is gone. Best effort: a
    directory that cannot be listed, or a file this user may not delete, is left to the save itself."""
    pattern, host = _temp_pattern(path), _host_tag()
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or match.group(1) != host:
            continue
        if not _writer_alive(int(match.group(2)), match.group(3)):
            try:
                os.unlink(entry.path)
            except OSError:  # removed by another save first, or not ours to remove
                pass


def _create_temp(path: Path) -> tuple:
    pid = os.getpid()
    name = f".{path.name}.tmp-{_host_tag()}-{pid}-{_start_time(pid)}-{secrets.token_hex(4)}"
    tmp = path.parent / name
    # 0o666: the OS applies the umask, as for torch.save (mkstemp would make it private; reading the umask
    # means setting it, which changes process state under other threads).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    return tmp, fd


class _HashingWriter:
    """What torch.save writes to: hashes every byte on its way to the file (no copy of the payload) and
    keeps the OSError a failed write raised, which torch would report as 'unexpected pos'."""

    def __init__(self, file: BinaryIO):
        self._file = file
        self.hash = hashlib.sha256()
        self.tail = b""
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            written = self._file.write(data)
        except OSError as error:
            self.error = error
            raise
        self.hash.update(data)
        self.tail = (self.tail + bytes(data[-_EOCD_LEN:]))[-_EOCD_LEN:]
        return written

    def flush(self) -> None:
        self._file.flush()

    def append_digest(self) -> None:
        """Turn the digest into the archive's zip comment (the comment length is the archive's last field)."""
        if not (self.tail.startswith(_EOCD_SIGNATURE) and self.tail.endswith(b"\0\0")):
            raise RuntimeError("torch.save wrote an archive without a plain end record; this tnlayers cannot "
                               "add its checksum (please report the torch version)")
        self._file.seek(-2, os.SEEK_END)
        self._file.write(struct.pack("<H", FOOTER_LEN) + MAGIC + self.hash.hexdigest().encode())


def _write_failed(path: Path, error: OSError) -> OSError:
    """The OSError to raise: what happened, that the old file is intact, what to do."""
    kept = (f"the previous checkpoint at {str(path)!r} is intact" if path.exists()
            else f"nothing was written at {str(path)!r}")
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        message = (f"no space left on device while writing checkpoint {str(path)!r}; {kept} and the partial "
                   "file was removed; free some space and save again")
    else:
        message = f"could not write checkpoint {str(path)!r}: {error}; {kept}"
    return OSError(error.errno, message) if error.errno is not None else OSError(message)


def write_atomic(path: Path, payload: Dict[str, Any]) -> None:
    """torch.save ``payload`` to ``path`` with its checksum: complete and renamed into place, or not at all."""
    remove_stale_temps(path)
    tmp, fd = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as file:
            writer = _HashingWriter(file)
            try:
                torch.save(payload, writer)
            except RuntimeError as error:
                if writer.error is None:
                    raise
                raise writer.error from error
            writer.append_digest()
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(error, OSError):
            raise _write_failed(path, error) from error
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _corrupt(path: Path, what: str) -> ValueError:
    return ValueError(f"checkpoint {str(path)!r} is corrupt ({what}) and was not loaded; "
                      "use an earlier checkpoint")


def _verify(file: BinaryIO, path: Path) -> bool:
    """True when the file carries a checksum and it matches; False when it carries none (version 1)."""
    size = os.fstat(file.fileno()).st_size
    if size < _EOCD_LEN + FOOTER_LEN:
        return False
    file.seek(size - FOOTER_LEN - 2)
    tail = file.read(FOOTER_LEN + 2)
    if tail[2:2 + len(MAGIC)] != MAGIC:
        return False
    if tail[:2] != struct.pack("<H", FOOTER_LEN):
        raise _corrupt(path, "damaged checksum record")
    digest = hashlib.sha256()
    file.seek(0)
    remaining = size - FOOTER_LEN - 2
    while remaining:  # in chunks: the payload is read once more by torch.load, never held twice
        chunk = file.read(min(_CHUNK, remaining))
        if not chunk:
            raise _corrupt(path, "file shrank while being read")
        digest.update(chunk)
        remaining -= len(chunk)
    digest.update(b"\0\0")  # the comment length as it was when hashed
    if not hmac.compare_digest(digest.hexdigest().encode(), tail[2 + len(MAGIC):]):
        raise _corrupt(path, "checksum mismatch")
    return True


def _refused_type(error: Exception) -> Optional[str]:
    """The class weights_only loading refused, when that is what ``error`` says."""
    if not isinstance(error, pickle.UnpicklingError):
        return None
    match = re.search(r"GLOBAL ([\w.]+)", str(error))
    return match.group(1) if match else None


def read_verified(path: Path, map_location: Any, weights_only: bool) -> tuple:
    """``(payload, verified)``: the checksum is checked before ``torch.load`` (nothing is restored yet)."""
    with open(path, "rb") as file:
        verified = _verify(file, path)
        file.seek(0)
        try:
            payload = torch.load(file, map_location=map_location, weights_only=weights_only)
        except Exception as error:  # truncated zip, foreign pickle, a type weights_only refuses...
            refused = _refused_type(error)
            if refused is not None:
                raise ValueError(
                    f"checkpoint {str(path)!r} holds an object of type {refused}, which weights_only loading "
                    "refuses; it was not loaded. If you trust the file, pass weights_only=False (or allow the "
                    "type with torch.serialization.add_safe_globals)") from error
            raise ValueError(f"checkpoint {str(path)!r} is corrupt or truncated and was not loaded: "
                             f"{error}") from error
    return payload, verified
