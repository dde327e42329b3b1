"""Generated gRPC code for protos/pml/v1 (scripts/protos regenerates it; do not edit)."""
