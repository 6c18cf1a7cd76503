"""Evaluation of the lineage: base, target, each adapted model and the merged model on every fine-tune's held-out
split and on retention sets, one model in memory at a time; a table, a chart and report.json."""
