"""Serving requests: the scheduler (a pure policy and its driver), generation and inference, the chain and its
gate, the prefix index, the result cache, stop sequences, the tokenizer side and the request log."""
