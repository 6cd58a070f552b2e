"""``python -m rf2``: the same as the ``rf2`` command (rf2.cli.main)."""

from rf2.cli.main import main

if __name__ == "__main__":
    main()
