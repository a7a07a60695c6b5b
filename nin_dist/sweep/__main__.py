"""`python -m nin_dist.sweep`: the same as `nin-sweep`."""

from nin_dist.sweep.cli import cli

if __name__ == "__main__":
    cli()
