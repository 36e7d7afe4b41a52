"""Generated gRPC/protobuf modules of the public Generation service (see generation.proto for
the command)."""
