"""The merge search: a space of merge configurations (space), how a merge is judged (objective), the Optuna study
that runs and resumes trials (study), where it lives (storage: SQLite or a PostgreSQL server) and what names it
(identity), how processes on one or several machines take turns on it (coordination), one process's trials merged
in memory (trials), and its outputs (leaderboard)."""
