from iqa_cli.cli import entry

entry()
