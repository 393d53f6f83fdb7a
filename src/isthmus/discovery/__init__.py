"""Discovery: sources of the mesh model (file, Kubernetes) and the immutable MeshView they produce."""
