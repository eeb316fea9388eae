"""Local mode: manifests from files, a file-backed object store, the runner."""
