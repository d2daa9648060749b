"""One module per subcommand; each registers itself on the typer app in ``sinet_cli.app``."""
