"""The Kubernetes face: kopf handlers that turn jobs into PyTorchJobs, and what they render and read. No torch here."""
