"""One site's training and evaluation, the baselines, simulated attacks, model checks."""
