"""The library under the pipeline's four stages (stages/) and the tools users run (tools/).

From the ground up: mnist (the dataset's facts), paths, files, host, signals; geometry (what
an architecture weighs) and config (params.yaml as typed, validated objects); tracking (the
MLflow store and runs) and lineage; fetch (MNIST from its sources); runtime (device and
precision), model, data and loop (TrainingRun); plan (the checks before a run), checkpoint,
resume, export (the model users call) and report (the evaluate stage's reports).
"""
