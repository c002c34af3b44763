from mace.cli import run

run()
