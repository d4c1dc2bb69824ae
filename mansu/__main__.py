"""`python -m mansu` = the `mansu` console script."""

from mansu.cli import main

main()
