"""The merge search: a space of merge configurations (space), how a merge is judged (objective), the Optuna study
that runs and resumes trials (study), one process's trials merged in memory (trials), and its outputs
(leaderboard)."""
