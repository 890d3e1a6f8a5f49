"""`python -m maskjax <command>`: the same as the `maskjax` console script."""

from maskjax.cli import main

main()
