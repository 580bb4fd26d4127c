"""`python -m megarlhf ...` (also what `torchrun -m megarlhf ...` runs on every rank)."""

from megarlhf.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
