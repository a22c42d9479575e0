"""What a device reports besides its copy's weights: one type for every runtime.

A device that trained its copy of the co-submodel reports how it trained (epochs, optimizer steps, samples seen, why
it stopped), what its copy counts for in fusion (its sample count and, when the rule asks, its samples per class), the
privacy it has spent (DP-SGD) and the bytes its compressed copy took. The same :class:`DeviceReport` is written to a
device stage's progress record (:mod:`dcccl.artifacts.device_progress`, a JSON file that a resumed round and the run's
metrics read) by a simulated round and by the Flower cloud, and crosses Flower's wire as a device's ``counts``.

Two plain forms, whose keys are fixed by the files and messages already written:

- the record (:meth:`DeviceReport.to_record`): ``device``, ``epochs``, ``steps``, ``samples``, ``stopped``, and what
  applies of ``sample_count``, ``class_counts``, ``last_loss``, ``rank``, ``privacy``, ``wire``, ``refused``, ``copy``,
  ``copy_sha256``;
- the wire (:meth:`DeviceReport.to_wire`, a Flower ``MetricRecord``): ``sample-count``, ``epochs``, ``steps``,
  ``samples``, and what applies of ``epsilon`` and ``class-counts``.

Reading either form checks every type (a device may lie, or break): :class:`MalformedReport` names the value that is
wrong, instead of a crash later where the value is used. Whether the figures are plausible (a sample count the device
can hold) is the reply checks' concern (:mod:`dcccl.federated.replies`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Optional, TypeVar

from dcccl.artifacts.device_progress import finished_records, record_finished
from dcccl.errors import DCCCLError

T = TypeVar("T")


class MalformedReport(DCCCLError, ValueError):
    """A device's report holds a value of the wrong type, or lacks one it must give."""


def _whole(value: Any, what: str) -> int:
    """``value`` if it is a whole number (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedReport(f"its {what} is {value!r}, not a whole number")
    return value


def _number(value: Any, what: str) -> float:
    """``value`` if it is a real number, kept as given (an ``int`` stays one, so a record reads back unchanged)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MalformedReport(f"its {what} is {value!r}, not a number")
    return value


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise MalformedReport(f"its {what} is {value!r}, not text")
    return value


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise MalformedReport(f"its {what} is {value!r}, not a mapping")
    return value


def _required(values: Mapping[str, Any], key: str) -> Any:
    if key not in values:
        raise MalformedReport(f"it gives no {key}")
    return values[key]


def _read(values: Mapping[str, Any], key: str, read: Callable[[Any, str], T]) -> T:
    """``values[key]`` as ``read`` reads it; it must be there."""
    return read(_required(values, key), key)


def _read_optional(values: Mapping[str, Any], key: str, read: Callable[[Any, str], T]) -> Optional[T]:
    """``values[key]`` as ``read`` reads it (``None`` when it is not there)."""
    value = values.get(key)
    return None if value is None else read(value, key)


def _whole_numbers(value: Any, what: str) -> tuple[int, ...]:
    """``value`` if it is a list (or tuple) of whole numbers, as a tuple."""
    if not isinstance(value, (list, tuple)):
        raise MalformedReport(f"its {what} is {value!r}, not a list of whole numbers")
    wrong = [item for item in value if isinstance(item, bool) or not isinstance(item, int)]
    if wrong:
        raise MalformedReport(f"its {what} hold {wrong[0]!r}, not a whole number")
    return tuple(value)


@dataclass(frozen=True)
class PrivacySpent:
    """The privacy a device has spent (DP-SGD), over every round it took part in so far.

    Args:
        epsilon: The epsilon its accountant gives (the only figure that crosses Flower's wire).
        delta: The delta it is given at.
        noise_multiplier: The noise of its DP-SGD this round.
        sample_rate: Its Poisson sampling rate.
        max_grad_norm: The clipping norm of each sample's gradient.
        accountant: Opacus' accountant (``rdp`` or ``prv``).
    """

    epsilon: float
    delta: Optional[float] = None
    noise_multiplier: Optional[float] = None
    sample_rate: Optional[float] = None
    max_grad_norm: Optional[float] = None
    accountant: Optional[str] = None

    def to_dict(self) -> dict[str, Any]:
        """The figures it holds (those it does not hold are left out)."""
        return {item.name: getattr(self, item.name) for item in fields(self) if getattr(self, item.name) is not None}

    @classmethod
    def from_dict(cls, values: Any) -> PrivacySpent:
        """Read back :meth:`to_dict`'s form (unknown keys are ignored).

        Raises:
            MalformedReport: For a value of the wrong type, or no epsilon.
        """
        values = _mapping(values, "privacy")
        return cls(_read(values, "epsilon", _number), _read_optional(values, "delta", _number),
                   _read_optional(values, "noise_multiplier", _number), _read_optional(values, "sample_rate", _number),
                   _read_optional(values, "max_grad_norm", _number), _read_optional(values, "accountant", _text))


@dataclass(frozen=True)
class WireBytes:
    """The bytes a device's copy took each way when it did not cross as a plain export (compressed, or SecAgg+).

    Args:
        down_bytes: Bytes of the round's co-submodel as the device received it.
        up_bytes: Bytes of its copy (or masked update) as it went up.
    """

    down_bytes: int
    up_bytes: int

    def to_dict(self) -> dict[str, int]:
        """Both figures."""
        return {"down_bytes": self.down_bytes, "up_bytes": self.up_bytes}

    @classmethod
    def from_dict(cls, values: Any) -> WireBytes:
        """Read back :meth:`to_dict`'s form.

        Raises:
            MalformedReport: For a figure missing or not a whole number.
        """
        values = _mapping(values, "wire")
        return cls(_read(values, "down_bytes", _whole), _read(values, "up_bytes", _whole))


# Keys of the record that hold a plain value, left out when the report holds none.
_PLAIN_OPTIONAL = ("sample_count", "last_loss", "rank", "refused", "copy", "copy_sha256")


@dataclass(frozen=True)
class DeviceReport:
    """What one device reports of one round, besides its copy's weights.

    Args:
        device: The device.
        epochs: Epochs it trained.
        steps: Optimizer steps it took.
        samples: Training samples it went through (each time it saw one).
        stopped: Why it stopped (or how the cloud got its copy).
        sample_count: The samples its copy counts for in fusion (in a simulated round's record: ``None``, the copy's
            export holds it).
        class_counts: Its samples per class, when the aggregation rule asks for them (likewise).
        last_loss: The training loss of its last batch.
        rank: The process that trained it (a simulated round).
        privacy: The privacy it has spent (DP-SGD).
        wire: The bytes its copy took each way, when not a plain export.
        refused: Why the cloud refused its reply (the fusion leaves its copy out for the same reasons).
        copy: The copy's file (set when the report is recorded).
        copy_sha256: The copy's SHA-256 then (a resumed round skips the device only if its copy still has it).
    """

    device: int
    epochs: int
    steps: int
    samples: int
    stopped: str = ""
    sample_count: Optional[int] = None
    class_counts: Optional[tuple[int, ...]] = None
    last_loss: Optional[float] = None
    rank: Optional[int] = None
    privacy: Optional[PrivacySpent] = None
    wire: Optional[WireBytes] = None
    refused: Optional[str] = None
    copy: Optional[str] = None
    copy_sha256: Optional[str] = None

    @classmethod
    def unreadable(cls, device: int, stopped: str, reason: str) -> DeviceReport:
        """The report the cloud keeps of a device whose own report it could not read: it claims no training and no
        sample count (so the fusion refuses the copy too), and says why."""
        return cls(device, 0, 0, 0, stopped, refused=reason)

    def to_record(self) -> dict[str, Any]:
        """The progress record's form (JSON): every figure it holds, none it does not."""
        record: dict[str, Any] = {"device": self.device, "epochs": self.epochs, "steps": self.steps,
                                  "samples": self.samples, "stopped": self.stopped}
        record.update({key: getattr(self, key) for key in _PLAIN_OPTIONAL if getattr(self, key) is not None})
        if self.class_counts is not None:
            record["class_counts"] = list(self.class_counts)
        if self.privacy is not None:
            record["privacy"] = self.privacy.to_dict()
        if self.wire is not None:
            record["wire"] = self.wire.to_dict()
        return record

    @classmethod
    def from_record(cls, record: Any) -> DeviceReport:
        """Read a progress record (unknown keys are ignored).

        Raises:
            MalformedReport: For a value of the wrong type, or a figure missing.
        """
        record = _mapping(record, "record")
        privacy, wire = record.get("privacy"), record.get("wire")
        return cls(_read(record, "device", _whole), _read(record, "epochs", _whole), _read(record, "steps", _whole),
                   _read(record, "samples", _whole), _read(record, "stopped", _text),
                   sample_count=_read_optional(record, "sample_count", _whole),
                   class_counts=_read_optional(record, "class_counts", _whole_numbers),
                   last_loss=_read_optional(record, "last_loss", _number),
                   rank=_read_optional(record, "rank", _whole),
                   privacy=None if privacy is None else PrivacySpent.from_dict(privacy),
                   wire=None if wire is None else WireBytes.from_dict(wire),
                   refused=_read_optional(record, "refused", _text), copy=_read_optional(record, "copy", _text),
                   copy_sha256=_read_optional(record, "copy_sha256", _text))

    def to_wire(self) -> dict[str, Any]:
        """The form that crosses Flower's wire (a ``MetricRecord`` of numbers): the sample count, the training
        figures, the epsilon spent and the samples per class, as they apply."""
        values: dict[str, Any] = {"sample-count": int(self.sample_count or 0), "epochs": self.epochs,
                                  "steps": self.steps, "samples": self.samples}
        if self.privacy is not None:
            values["epsilon"] = float(self.privacy.epsilon)
        if self.class_counts is not None:
            values["class-counts"] = list(self.class_counts)
        return values

    @classmethod
    def from_wire(cls, device: int, values: Any, stopped: str = "") -> DeviceReport:
        """What ``device`` sent (:meth:`to_wire`'s form) as a report that says it ``stopped`` so; unknown keys are
        ignored.

        Raises:
            MalformedReport: For a value of the wrong type, or a figure missing (the message says which).
        """
        try:
            values = _mapping(values, "counts")
            epsilon = _read_optional(values, "epsilon", _number)
            return cls(device, _read(values, "epochs", _whole), _read(values, "steps", _whole),
                       _read(values, "samples", _whole), stopped, _read(values, "sample-count", _whole),
                       _read_optional(values, "class-counts", _whole_numbers),
                       privacy=None if epsilon is None else PrivacySpent(epsilon))
        except MalformedReport as err:
            raise MalformedReport(f"device {device}'s report is malformed: {err}") from None

    def with_counts(self, sample_count: Optional[int], class_counts: Optional[Sequence[int]]) -> DeviceReport:
        """This report with the counts its copy goes up with."""
        per_class = None if class_counts is None else tuple(int(count) for count in class_counts)
        return replace(self, sample_count=sample_count, class_counts=per_class)


def record_report(work_dir: Path, copy: Path, report: DeviceReport) -> DeviceReport:
    """Record in ``work_dir``'s progress that ``report.device`` wrote ``copy`` (call after the copy is written);
    returns the report as recorded (naming the copy and its SHA-256)."""
    details = replace(report, copy=None, copy_sha256=None).to_record()
    return DeviceReport.from_record(record_finished(work_dir, report.device, copy, details))


def finished_reports(work_dir: Path, devices: Sequence[int]) -> list[DeviceReport]:
    """The recorded reports of those of ``devices`` that finished, in that order.

    Raises:
        MalformedReport: For a record that is not a report.
    """
    return [DeviceReport.from_record(record) for record in finished_records(work_dir, list(devices))]
