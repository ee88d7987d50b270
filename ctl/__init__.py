"""What a user holds: the `petalctl` CLI and the Python client for the daemon's Unix socket."""
