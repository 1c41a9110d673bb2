"""Message size limits, in one place for the SDK and every server (no heavy imports: the SDK uses it).

- Internal links (worker to worker, the registry's clients, the parameter service) carry packed hidden
  states and weight chunks: MAX_MESSAGE_BYTES each way.
- The coordinator's public port receives at most `CoordinatorConfig.max_request_bytes` (4 MiB by default;
  gRPC answers a larger message with RESOURCE_EXHAUSTED before any handler runs) and sends at most
  MAX_RESPONSE_BYTES, which the SDK's channels accept.
"""

from __future__ import annotations

MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# the largest response the coordinator sends: an Infer of 1024 inputs (the default max_infer_batch) of
# embeddings up to 16384 floats wide; an Infer whose result would be larger is refused before it runs
MAX_RESPONSE_BYTES = 64 * 1024 * 1024

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
