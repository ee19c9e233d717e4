"""The `corral` command: one module per subcommand (`add_arguments(parser)`, `run(args)`).

    cli.py         the entry point and the subcommand table
    up.py          `corral up`: plan, start the backends, run the gateway in-process
    plan.py        `corral plan`: explain the placement, start nothing
    status.py      `corral status`: the fleet at a glance
    gateway.py     `corral gateway`: the gateway alone
    gateway_workers.py  `corral gateway --workers N`: the supervisor and its worker processes
    rig.py         which rig a run drives: real GPUs with `ollama`, or the simulated one
"""
