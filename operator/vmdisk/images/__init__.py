"""Base images: sources, fetching, verification and the node-local cache."""
