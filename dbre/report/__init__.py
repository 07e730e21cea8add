"""Reports: the requirements analysis, and the policy, runbook and DR plan documents it fills in."""
