"""shardline: the client SDK and wire types (light: grpcio, protobuf, numpy; never torch)."""

__version__ = "0.1.0"
