"""The coordinator's surfaces: the gRPC servicers (Coordinator, admin, jobs, worker registry), KServe v2, the
OpenAI-compatible HTTP gateway, and the server that wires them. Protobuf <-> domain at the edge only."""
