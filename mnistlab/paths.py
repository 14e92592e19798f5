"""Where the stages write: every output file of the pipeline, named once (dvc.yaml lists the
same paths as the stages' outputs)."""

from pathlib import Path

MODELS = Path("models")
MODEL_FILE = MODELS / "model.pt"            # train: the final model (weights + architecture)
CHECKPOINT_FILE = MODELS / "checkpoint.pt"  # train: after every epoch, for train.resume

REPORTS = Path("reports")
PLAN_FILE = REPORTS / "plan.json"                    # validate
CURVES_FILE = REPORTS / "training_curves.csv"        # train: per-epoch metrics (DVC plots)
TRAIN_METRICS_FILE = REPORTS / "train_metrics.json"  # train: summary
METRICS_FILE = REPORTS / "metrics.json"              # evaluate
PER_CLASS_FILE = REPORTS / "per_class_accuracy.csv"
PREDICTIONS_FILE = REPORTS / "predictions.csv"
REPORT_JSON = REPORTS / "model_report.json"
REPORT_MD = REPORTS / "model_report.md"
FIGURES = REPORTS / "figures"
