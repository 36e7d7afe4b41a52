"""Generated gRPC/protobuf modules of the expert transport (see expert.proto for the command)."""
