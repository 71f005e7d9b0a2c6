"""The subcommands of `galatea`, one module each with `add_parser(sub)` and `run(args)`; the
flags and loading several share are in `common`. The top layer: commands may import anything."""
