"""The `pm-hf` command: subcommands, config parsing, usage, and `pm-hf check`."""
