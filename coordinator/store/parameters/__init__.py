"""The parameter service: manifests and tensor bytes, streamed in chunks straight from the store."""
