"""Per-token times handed from a generating process to `edge-runtime monitor` through a file.

The monitor sets TOKEN_LOG_ENV in its child's environment; the child's runtime appends one
time.monotonic() line per token (CLOCK_MONOTONIC is machine-wide, so the two processes agree)."""

TOKEN_LOG_ENV = "EDGE_RUNTIME_TOKEN_LOG"
