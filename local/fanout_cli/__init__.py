"""`fanout`: the command line client of the jobs API (fanout_cli.main)."""
