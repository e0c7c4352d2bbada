"""Checks on a job a client wants to queue (no database needed)."""

from __future__ import annotations

from datetime import timedelta

from waystation import validate
from waystation.durations import DurationError, parse_go_duration
from waystation.errors import FailedPrecondition, InvalidArgument
from waystation.protocol import vagrant_server_pb2 as vs

MAX_LABELS = 64


def check_new_job(job: vs.Job) -> None:
    """Raise FailedPrecondition naming the first missing or wrong field."""
    if job.id:
        raise FailedPrecondition("job id must be empty: the server assigns it")
    runner = job.target_runner.WhichOneof("target")
    if runner is None:
        raise FailedPrecondition("job target_runner is required")
    if runner == "id":
        validate.name("job", job.target_runner.id.id, field="target_runner id")
    if job.WhichOneof("operation") is None:
        raise FailedPrecondition("job operation is required")
    if job.WhichOneof("operation") == "command" and not job.command.command:
        raise FailedPrecondition("job command operation needs a command name")
    if len(job.labels) > MAX_LABELS:
        raise InvalidArgument(f"job has {len(job.labels)} labels, at most {MAX_LABELS}")
    for key, value in job.labels.items():
        validate.name("job", key, field="label name")
        if len(value) > validate.MAX_PATH:
            raise InvalidArgument(f"job label {key!r} is too long")
    if job.data_source.WhichOneof("source") == "git":
        validate.git_source(job.data_source.git)
    validate.record_size("job", job.ByteSize())


def parse_expiry(text: str) -> timedelta | None:
    """QueueJobRequest.expires_in: empty means never; else a Go duration."""
    if not text:
        return None
    try:
        duration = parse_go_duration(text)
    except DurationError as exc:
        raise FailedPrecondition(f"Invalid expiry duration: {exc}") from None
    if duration < timedelta(0):
        raise FailedPrecondition(f"Invalid expiry duration: {text!r} is negative")
    return duration
