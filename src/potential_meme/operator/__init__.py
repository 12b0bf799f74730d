"""The Kubernetes face: render PyTorchJobs for planned stages (and, later, the kopf handlers). No torch here."""
