"""Serving blocks to the swarm. Top to bottom (a module imports only those below it):

- `host`: `Host`, the one owner of what this daemon serves (plan, serve, unserve, move, status, stop).
- `rebalancer`: moves a span where the swarm is weakest, through its `Mover` (the Host).
- `plan`: what to serve, resolved before any weight is read; loading a span. `throughput`: measured and cached.
- `block_server`: `BlockServer`, the RPC handlers (info, forward, backward, inference, push) and announcements.
- `inference`: the server side of one inference stream. `push`: server-to-server inputs and outputs.
- `compute` (the math, one builder per RPC reply), `worker` (the compute thread), `kv_pool` (the KV budget).
- `placement` (pure span policy), `settings`, `errors` (ServeError, ComputeTimeout, ErrorReply).
"""
