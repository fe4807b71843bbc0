"""``python -m fl_imaging.cli ...`` runs ``fl-imaging ...``."""

from fl_imaging.cli.main import main

main()
