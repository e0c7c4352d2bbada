"""gRPC metadata keys of waystation's own extensions to the upstream protocols.

Shared by the server and the runner agent, so it imports nothing: the runner
must not pull in the server or the store (SQLAlchemy).
"""

from __future__ import annotations

# RunnerJobStream request metadata: the id of a RUNNING job this runner carries
# on with after losing the server. The first message is the usual Request; the
# answer is the job's Assignment again (not acked again) or FAILED_PRECONDITION.
RESUME_JOB = "waystation-resume-job"

# RunnerJobStream response header, on a resumed stream only: how many output
# events (Terminal events, one by one from the job's first) the server holds
# persisted. The runner re-sends its output from that event on.
RESUME_EVENTS = "waystation-resume-events"
