"""Multi-process and end-to-end tests (gloo on CPU); marker infra: real clusters and servers."""
