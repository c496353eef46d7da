"""Batch generation from a JSON-lines file of requests: resumable, local or on a Ray cluster
(requests.py: the lines and their keys; runner.py: the local run and results; ray_runner.py)."""
