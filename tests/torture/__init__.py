"""Torture suite (issue 11): dbre's commands killed with SIGKILL at random instants, local and on a
real S3 server (moto_server), each kill followed by the checks a person would need to trust the
repository again: `verify --read-data` clean, every snapshot restoring to exactly its recorded
content, the next run succeeding without anyone clearing a lock.

The CI part runs the trials of ``harness.CI_TRIALS`` (200); ``DBRE_TORTURE_TRIALS=2000`` scales every
cell tenfold (the long run), ``DBRE_TORTURE_SEED`` picks another seed (every failure message names
the one it ran with). The figures (trials, kills, restores, data lost) are printed at the end of
the session and written to bench-output/torture.json.
"""
