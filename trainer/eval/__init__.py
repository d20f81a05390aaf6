"""Open-loop evaluation of checkpoints on held-out episodes (`wam eval`, `wam demo`, regression suites):
held-out data (heldout.py), rollouts and their metrics (rollouts.py), reports (reporting.py), and the entry
point `run_eval` (evaluate.py)."""
