"""Small file and process helpers every part of fl-imaging uses."""
