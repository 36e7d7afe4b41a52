"""Tracing (OpenTelemetry) shared by every zayaserve process: ingress, workers, shards and the
placement controller."""
