"""Cluster tooling: a local multi-node Ray cluster for development (local_cluster.py), KubeRay manifests
(kuberay/) and notes (README.md). The cloud cluster-launcher config is ray_cluster.yaml at the repo root."""
