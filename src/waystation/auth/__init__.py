"""Authentication: token format, minting and checking."""
