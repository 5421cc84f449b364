"""The ``fleetlearn`` command: composes the subcommands each package owns.

This package holds no domain code. Each of ``broker_bridge``, ``edge_runtime``,
``cloud_aggregator`` and ``device_profiles`` registers its own subcommands through a
``_cli.register(subparsers)`` function; heavy imports happen inside the handlers so
that ``fleetlearn agent`` on a device never loads the cloud side.
"""

__all__: list[str] = []
