"""Kubernetes operator (kopf) for TrainJobs. Imports wam.platform only; never torch."""
