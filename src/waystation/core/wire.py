"""Every gRPC metadata key waystation reads or writes, upstream's and its own.

Shared by the server and its clients (CLI, runner agent, provisioner daemon),
so it imports nothing: a client must not pull in the server or the store
(SQLAlchemy) for a string.
"""

from __future__ import annotations

# Every authenticated call: the token (upstream's format), bare, no "Bearer".
AUTHORIZATION = "authorization"

# Vagrant calls: "<minimum>,<current>" API versions the client speaks; the
# server refuses a range it cannot overlap.
API_PROTOCOL = "client-api-protocol"

# Token RPCs (BootstrapToken, GenerateLoginToken, GenerateInviteToken): the
# user the token is for, where upstream's requests have no field for it; absent,
# the caller's own user (bootstrap: "admin").
TOKEN_USER = "waystation-token-user"
# GenerateLoginToken: how long the token is valid (a Go duration; "0": until
# revoked, admins only), absent: the server's --token-ttl. And a label for
# `token list`. GenerateInviteToken: the label, and the role of the user the
# invite creates (absent: member).
TOKEN_TTL = "waystation-token-ttl"
TOKEN_LABEL = "waystation-token-label"
INVITE_ROLE = "waystation-invite-role"

# ProvisionerDaemon calls: who the daemon is (upstream Coder puts the same
# facts in its connection's query string).
# Its id, required: jobs are owned by this id, so a daemon that reconnects
# under the same id keeps reporting on its job.
DAEMON_ID = "provisioner-daemon-id"
# A provisioner type it serves: the key repeated, or values comma-separated.
DAEMON_PROVISIONER = "provisioner-daemon-provisioner"
# `key=value`, repeated: it takes only jobs whose tags are all among these.
DAEMON_TAG = "provisioner-daemon-tag"

# RunnerJobStream request metadata: the id of a RUNNING job this runner carries
# on with after losing the server. The first message is the usual Request; the
# answer is the job's Assignment again (not acked again) or FAILED_PRECONDITION.
RESUME_JOB = "waystation-resume-job"

# RunnerJobStream response header, on a resumed stream only: how many output
# events (Terminal events, one by one from the job's first) the server holds
# persisted. The runner re-sends its output from that event on.
RESUME_EVENTS = "waystation-resume-events"
