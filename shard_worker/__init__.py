"""shard_worker: hosts a contiguous range of a model's layers and runs it on batches of sequences."""
