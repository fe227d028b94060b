"""The ``osd-fleet`` command line: the only code that parses arguments.

``osd_cli.main`` holds the entry point and its one error boundary; ``delta_commands`` the
single-process commands (compress, reconstruct, evaluate, workloads); ``fleet`` the pipeline,
catalog and operations commands; ``demo`` the demo's presentation.
"""
