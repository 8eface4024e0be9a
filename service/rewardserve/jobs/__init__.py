"""Training jobs: the store (SQLite), the manager (queue, supervision, restarts), the runners
(local processes, Ray job submission) and the worker entrypoint they start. The worker reaches
the service only through its public API, so the same entrypoint runs on a Ray cluster."""
