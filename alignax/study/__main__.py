"""`python -m alignax.study`: see alignax/study/cli.py."""

from alignax.study.cli import cli

if __name__ == "__main__":
    cli()
