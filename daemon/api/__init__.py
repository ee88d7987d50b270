"""The control API on the local Unix socket (and an optional authenticated TCP port): see app.py for the wiring
and docs/architecture.md for what each module owns."""
