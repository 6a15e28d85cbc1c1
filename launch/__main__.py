from launch.cli import cli

cli()
