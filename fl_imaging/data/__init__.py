"""Site data: demo generation, site folders, splits."""
