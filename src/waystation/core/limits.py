"""Size limits that both ends of a connection must agree on.

Limits on single values (names, paths, records) are in `waystation.validate`,
next to the checks that apply them.
"""

from __future__ import annotations

# gRPC's default receive limit, stated so that it is one setting everywhere:
# the server, the clients, and the store's cap on what it sends back at once.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
