"""Runtime: where and how a network runs (device choice, PyTorch / OpenVINO forward
passes, several processes, int8 measurement)."""
