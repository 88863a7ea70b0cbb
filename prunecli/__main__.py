"""``python -m prunecli``: same as the ``prunecli`` console script."""

from prunecli.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
