"""Peers benchmark: duckfleet against the systems it replaces or competes with, in one run.

    python -m bench.peers [--quick]

Every peer is started by this harness on the same data and the same cores, measured, and
stopped (see servers.py); workloads.py holds what is measured, report.py what is written.
"""
