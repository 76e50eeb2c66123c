"""Conformance suites the harness plugin runs for each selected model (`pytest --model NAME`).

Each module sets SUITE; the plugin parametrizes its `check` argument with the
planned checks of that suite. Modules orchestrate: ask a backend worker for a
measurement, judge it with harness.checks, and conclude.
"""
