from iqa_cli.cli import main

main()
