"""``fl-imaging-bench``: named benchmarks of federated strategies against pooled and local-only
training (plan of cells, running them resumably, tables and plots)."""
