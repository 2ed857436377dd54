"""`python -m controller` runs the same CLI as `governor`."""

from controller.cli import main

main()
