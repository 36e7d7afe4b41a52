"""The front ends: the OpenAI-compatible REST API and the gRPC API, their protocols and
parsers, streams, errors, request checks, metrics and the engine clients they talk to."""
