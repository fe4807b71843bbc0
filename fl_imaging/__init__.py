"""fl-imaging: federated training and benchmarking of MONAI imaging models with Flower."""

__version__ = "0.1.0"
