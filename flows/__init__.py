"""Orchestration of osd-fleet: the command line, Prefect flows, planning, storage and catalog."""
