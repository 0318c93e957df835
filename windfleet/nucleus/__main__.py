"""``python -m windfleet.nucleus ...`` = ``windfleet ...`` (how the fleet starts device runtimes)."""

from windfleet.cli import main

main()
