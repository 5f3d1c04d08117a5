"""``python -m ueguard`` (also how ``torchrun -m ueguard`` reaches the CLI)."""

from ueguard.cli import main

main()
