"""Crash-safe local state of one device: the current task, its submission, the EF residual.

Every file is written atomically (temp file, fsync, ``os.replace``, fsync of the
folder), so a device killed at any instant finds either the old or the new version of
each file. What matters is the *order* of the writes around the one commit point:

1. ``submission.bin``: the encoded update body, its envelope fields and the new
   error-feedback residual, in one file.
2. ``task.json`` with status ``encoded`` and the sha256 of ``submission.bin``:
   **the commit point**. Before it, nothing was sent and the old residual is intact
   (a restart trains again); after it, the update exists and is only ever re-sent,
   byte for byte, with the same attempt: never trained again, so never counted twice.
3. ``residual.ef``: the new residual, copied from the submission. A crash between
   2 and 3 is repaired on start (:meth:`AgentState.recover` rolls it forward).
4. send; then ``task.json`` status ``acked`` once the aggregator acknowledged it.

A task in ``received``/``training`` at start-up is announced as ``busy_round`` in the
device's hello; the aggregator re-sends the task while the round is open.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from broker_bridge import ProtocolError, TaskSpec, atomic_write
from broker_bridge._files import DirLock, DirLockHeld
from edge_runtime._errors import AgentError

log = logging.getLogger(__name__)

STATE_FORMAT = "fleetlearn-agent-state/1"
TASK_FILE = "task.json"
SUBMISSION_FILE = "submission.bin"
RESIDUAL_FILE = "residual.ef"
_SUB_MAGIC = b"FLSB"
_SUB_HEAD = struct.Struct("<4sI")
MAX_SUBMISSION_HEADER = 64 * 1024


class StateError(AgentError, OSError):
    """The device's state folder cannot be read or written."""


class DiskFull(StateError):
    """No space left where the device keeps its state (``ENOSPC``)."""


class StateInUse(StateError):
    """Another agent holds the state folder (``Agent``'s lock): two would send the same
    device's updates twice over and overwrite each other's task."""


class TaskStatus(StrEnum):
    """Where a task stands; ``ENCODED`` and later mean an update exists and is final."""

    RECEIVED = "received"
    TRAINING = "training"
    ENCODED = "encoded"  # committed, not yet acknowledged: re-send, never re-train
    ACKED = "acked"  # the aggregator holds it
    REJECTED = "rejected"  # the aggregator refused it; a later task may retry (attempt + 1)
    DECLINED = "declined"  # withdrawn before anything was sent (deadline, ineligible)
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def submitted(self) -> bool:
        return self in (TaskStatus.ENCODED, TaskStatus.ACKED, TaskStatus.REJECTED)

    @property
    def in_progress(self) -> bool:
        return self in (TaskStatus.RECEIVED, TaskStatus.TRAINING)


@dataclass(frozen=True, kw_only=True)
class TaskRecord:
    """The last task this device took on, and how far it got."""

    task: TaskSpec
    status: TaskStatus
    attempt: int = 0
    submission_sha256: str | None = None

    def to_bytes(self) -> bytes:
        data = {
            "format": STATE_FORMAT,
            "task": self.task.to_dict(),
            "status": self.status.value,
            "attempt": self.attempt,
            "submission_sha256": self.submission_sha256,
        }
        return (json.dumps(data, sort_keys=True, indent=1) + "\n").encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> TaskRecord:
        try:
            data = json.loads(raw.decode("utf-8"))
            if data.get("format") != STATE_FORMAT:
                raise ValueError(f"unknown state format {data.get('format')!r}")
            sha = data.get("submission_sha256")
            return cls(
                task=TaskSpec.from_dict(data["task"]),
                status=TaskStatus(data["status"]),
                attempt=int(data["attempt"]),
                submission_sha256=str(sha) if sha is not None else None,
            )
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError,
                RecursionError, ProtocolError) as exc:
            raise StateError(f"unreadable {TASK_FILE}: {exc}") from exc


@dataclass(frozen=True, kw_only=True, eq=False)
class Submission:
    """An encoded update exactly as sent (and re-sent), plus the residual it leaves."""

    round: int
    attempt: int
    model_version: int
    codec: str
    body: bytes
    """The update message body: ``u32 meta_len | meta | codec body``."""
    residual: bytes | None = None
    """``ErrorFeedback.to_bytes()`` after this update, when the codec has ``ef``."""

    def to_bytes(self) -> bytes:
        head = json.dumps(
            {
                "round": self.round,
                "attempt": self.attempt,
                "model_version": self.model_version,
                "codec": self.codec,
                "body_len": len(self.body),
                "residual_len": None if self.residual is None else len(self.residual),
            },
            sort_keys=True,
        ).encode()
        return _SUB_HEAD.pack(_SUB_MAGIC, len(head)) + head + self.body + (self.residual or b"")

    @classmethod
    def from_bytes(cls, raw: bytes) -> Submission:
        if len(raw) < _SUB_HEAD.size:
            raise StateError(f"{SUBMISSION_FILE} is truncated")
        magic, n = _SUB_HEAD.unpack_from(raw, 0)
        if magic != _SUB_MAGIC or n > MAX_SUBMISSION_HEADER or _SUB_HEAD.size + n > len(raw):
            raise StateError(f"{SUBMISSION_FILE} is not a submission record")
        try:
            head: dict[str, Any] = json.loads(raw[_SUB_HEAD.size : _SUB_HEAD.size + n])
            start = _SUB_HEAD.size + n
            body_len = int(head["body_len"])
            res_len = head["residual_len"]
            end = start + body_len + (int(res_len) if res_len is not None else 0)
            if end != len(raw):
                raise ValueError("lengths do not add up")
            return cls(
                round=int(head["round"]),
                attempt=int(head["attempt"]),
                model_version=int(head["model_version"]),
                codec=str(head["codec"]),
                body=raw[start : start + body_len],
                residual=None if res_len is None else raw[start + body_len : end],
            )
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            raise StateError(f"{SUBMISSION_FILE} is malformed: {exc}") from exc


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CommitStep(StrEnum):
    """The points inside :meth:`AgentState.commit` between its writes (see the module
    docstring's order), reported to ``on_step`` for crash tests and tracing."""

    SUBMISSION_WRITTEN = "submission_written"
    """``submission.bin`` is on disk; ``task.json`` does not say ``encoded`` yet."""
    RECORD_COMMITTED = "record_committed"
    """``task.json`` says ``encoded`` (the commit point); ``residual.ef`` not yet rolled."""


class AgentState:
    """The state folder of one device (one per device, even with many agents per process)."""

    def __init__(
        self, *, directory: str | Path, on_step: Callable[[CommitStep], None] | None = None
    ) -> None:
        self.directory = Path(directory)
        self._lock = threading.RLock()
        self._record: TaskRecord | None = None
        self._submission: Submission | None = None
        self._on_step = on_step
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise state_error(f"cannot create state folder {self.directory}", exc) from exc
        self.recover()

    # -- reading -----------------------------------------------------------------------

    @property
    def record(self) -> TaskRecord | None:
        with self._lock:
            return self._record

    @property
    def submission(self) -> Submission | None:
        """The committed submission of the current record (``encoded`` or later)."""
        with self._lock:
            return self._submission

    def residual(self) -> bytes | None:
        """The current error-feedback residual (``ErrorFeedback.to_bytes``), if any."""
        try:
            return (self.directory / RESIDUAL_FILE).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise state_error(f"cannot read {RESIDUAL_FILE}", exc) from exc

    def recover(self) -> TaskRecord | None:
        """Load the record; finish a commit a crash interrupted (roll the residual forward)."""
        with self._lock:
            self._record = None
            self._submission = None
            path = self.directory / TASK_FILE
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise state_error(f"cannot read {path}", exc) from exc
            try:
                record = TaskRecord.from_bytes(raw)
            except StateError:
                log.exception("state in %s unreadable; starting afresh", self.directory)
                return None
            if record.status.submitted:
                submission = self._load_submission(record)
                if submission is None:
                    # The record says committed but the body is gone: never re-train a
                    # round that may have been sent. Keep it as rejected-by-us.
                    log.error("submission of round %d lost; not re-sending", record.task.round)
                    record = replace(record, status=TaskStatus.FAILED)
                else:
                    self._submission = submission
                    if submission.residual is not None and self.residual() != submission.residual:
                        log.info("completing the residual write of round %d", record.task.round)
                        self._write(RESIDUAL_FILE, submission.residual)
            self._record = record
            return record

    def _load_submission(self, record: TaskRecord) -> Submission | None:
        try:
            raw = (self.directory / SUBMISSION_FILE).read_bytes()
        except OSError:
            return None
        if _sha256(raw) != record.submission_sha256:
            return None
        try:
            return Submission.from_bytes(raw)
        except StateError:
            return None

    # -- writing -----------------------------------------------------------------------

    def _write(self, name: str, data: bytes) -> None:
        try:
            atomic_write(self.directory / name, data)
        except OSError as exc:
            raise state_error(f"cannot write {self.directory / name}", exc) from exc

    def _step(self, step: CommitStep) -> None:
        if self._on_step is not None:
            self._on_step(step)

    def begin(self, task: TaskSpec, *, attempt: int) -> TaskRecord:
        """Record a newly accepted task (status ``received``)."""
        record = TaskRecord(task=task, status=TaskStatus.RECEIVED, attempt=attempt)
        with self._lock:
            self._write(TASK_FILE, record.to_bytes())
            self._record = record
            self._submission = None
        return record

    def set_status(self, status: TaskStatus) -> TaskRecord | None:
        """Move the current record to ``status`` (never back from a committed one)."""
        with self._lock:
            record = self._record
            if record is None or record.status == status:
                return record
            if record.status.submitted and not status.submitted:
                raise StateError(
                    f"round {record.task.round} was submitted; it cannot become {status}"
                )
            if status == TaskStatus.ENCODED:
                raise StateError("use commit() to mark an update encoded")
            record = replace(record, status=status)
            self._write(TASK_FILE, record.to_bytes())
            self._record = record
            return record

    def commit(self, submission: Submission) -> TaskRecord:
        """Persist an encoded update and its residual: after this, re-send, never re-train."""
        raw = submission.to_bytes()
        with self._lock:
            record = self._record
            if record is None or record.task.round != submission.round:
                raise StateError("commit of a submission for a task this device does not hold")
            if record.status.submitted:
                raise StateError(f"round {submission.round} is already submitted")
            self._write(SUBMISSION_FILE, raw)
            self._step(CommitStep.SUBMISSION_WRITTEN)
            record = replace(
                record,
                status=TaskStatus.ENCODED,
                attempt=submission.attempt,
                submission_sha256=_sha256(raw),
            )
            self._write(TASK_FILE, record.to_bytes())  # the commit point
            self._record = record
            self._submission = submission
            self._step(CommitStep.RECORD_COMMITTED)
            if submission.residual is not None:
                self._write(RESIDUAL_FILE, submission.residual)
            return record

    def clear_residual(self) -> None:
        """Forget the residual (it belonged to another model's layout)."""
        with self._lock:
            try:
                (self.directory / RESIDUAL_FILE).unlink(missing_ok=True)
            except OSError as exc:
                raise state_error(f"cannot remove {RESIDUAL_FILE}", exc) from exc


def state_error(what: str, exc: OSError) -> StateError:
    if exc.errno == errno.ENOSPC:
        return DiskFull(errno.ENOSPC, f"{what}: no space left on device")
    return StateError(exc.errno or 0, f"{what}: {exc}")


AGENT_LOCK = "agent.lock"


def lock_state_folder(folder: Path) -> DirLock:
    """The lock that keeps ``folder`` to one agent (``broker_bridge._files.DirLock``):
    ``StateInUse`` naming the holder when another agent has it."""
    lock = DirLock(folder, AGENT_LOCK)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except DirLockHeld as exc:
        raise StateInUse(f"another agent uses the state folder {folder} ({exc.holder}): stop it "
                         "first, or give this one another --state-dir") from None
    except OSError as exc:
        raise state_error(f"cannot lock the state folder {folder}", exc) from exc
    return lock
