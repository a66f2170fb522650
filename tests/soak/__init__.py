"""The chaos soak: real Redis, Postgres, `serve --workers 2` and the persister under random,
seeded faults and operations, with a client-side ledger checked against both stores at the end.

Run it with `make soak` (`PYTHONPATH=tests python -m soak --seconds N --seed S --faults ...`);
tests/test_soak.py runs a short form in the suite. The modules import each other by their own
names (tests/ on the path, as pytest puts it).
"""
