"""``python -m quari …`` runs the command line, the same as the ``quari`` command."""

from quari.cli import main

if __name__ == "__main__":
    main()
