"""The gRPC gateway: authentication, the services of pml.v1, health and reflection."""
