"""The bottom layer: the model and settings everything else shares.

Job states and kinds (`states`), timeouts and the store's clock (`timeouts`),
size limits (`limits`), the server's settings (`settings`) and the gRPC
metadata keys of both protocols (`wire`). It imports nothing of waystation
but the generated `protocol` package, so the server, the runner agent, the
provisioner daemon and the CLI may all import it without loading a layer above
(an import-linter contract in pyproject.toml checks this).

The small leaf modules at the package root (`errors`, `ids`, `validate`,
`durations`, `versions`, `files`, `logs`) count as this layer too: they stay
where they are, imported from everywhere, and a contract checks that they
import nothing above it.

Layers, top to bottom: `server` (servicers), `engine`, `store`, `core`;
`runner/`, `provisioner/` and `cli/` use only the client side
(`client`, `protocol`, `core`).
"""
