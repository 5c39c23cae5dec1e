"""Scaling the cloud out: N cloud_server replicas behind HAProxy (local processes, compose, Kubernetes)."""
