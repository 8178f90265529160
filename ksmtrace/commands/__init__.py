"""One module per CLI subcommand: ``add_parser(subparsers)`` and ``run(args)``."""

COMMANDS = (
    "status",
    "demo",
    "run",
    "snoop",
    "optins",
    "faults",
    "ksmd",
    "estimate",
    "merge",
    "unmerge",
    "daemon",
    "top",
)
