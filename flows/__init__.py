"""Orchestration of osd-fleet: the fleet configuration, planning, the Prefect flows, reports and operations."""
