"""Peers benchmark: duckfleet against the systems it replaces or competes with, in one run.

    python -m bench.peers [--quick | --smoke]

Every peer is started by this harness on the same data and the same cores, measured, and
stopped (see servers.py); workloads.py holds what is measured, mixcheck.py the dashboard mix's
plan and answer check, verdict.py what fails a run, report.py what is written.
"""
