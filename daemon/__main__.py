"""`python -m petal.daemon`: the same as the `petald` command."""

from petal.daemon.main import main

main()
