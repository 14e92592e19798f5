"""Find the most accurate CNN under a parameter budget: an Optuna study, tracked in MLflow.

    python -m tools.search --budget 8000 --epochs 15 --trials 40      (`make search`)

What the source READMEs did by hand (pick channels, count the parameters, train, look,
repeat) done as a study. Optuna's TPE sampler proposes a layout and a recipe from a search
space (conf/search/<space>.yaml); the trial's model gets the widest channels that keep it
within the budget, and is built and counted before it trains (a layout that cannot fit
never trains); the median pruner stops a trial whose per-epoch validation accuracy falls
behind the others'. Trials are scored on a validation split, the last `--validation`
training images (`train.validation`), so no trial reads a test image; the best trial's
final-epoch validation accuracy wins. The winner becomes a preset, conf/preset/<name>.yaml,
trained on all 60,000 images like every preset; `make repeats PRESETS=<name>` then measures
its test accuracy, once, over several random seeds.

The study lives in Optuna's storage: search.db at the repo root by default, or the URL in
SEARCH_STORAGE (PostgreSQL), which any number of workers on any number of machines join by
running the same command (Optuna's distributed mode); together they run exactly --trials
trials. In MLflow (experiment `mnist-cnn-search`) the study is one parent run and each
trial a child run with its params, per-epoch metrics and its state.

Ctrl-C or SIGTERM marks the running trial failed and stops; the same command continues the
study (named by --study), and a finished trial is never run again.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mnistlab import tracking
from mnistlab.signals import raise_keyboard_interrupt, signals_deferred
from mnistlab import geometry
from mnistlab.mnist import TRAIN_IMAGES
from mnistlab.config import PRESETS_DIR, ConvLayer, Model, Params, ParamsError, compose, echo, parse_params
from tools.search_space import (
    MIN_WIDTH,
    Layout,
    Range,
    SearchError,
    Spec,
    fit,
    load_space,
    smallest_model,
    suggest,
    unbuildable,
)

EXPERIMENT = "mnist-cnn-search"
STUDY_TAG = "search_study"  # on the study's parent run and on every trial's run
# A running trial records a heartbeat in the study after every epoch; one not heard from for
# this long (its worker was killed, its machine lost) is failed by the next worker that looks,
# so that its place in the study is run again rather than held for ever.
HEARTBEAT_GRACE_S = 1800
PROG = "tools.search"


# --- one trial ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What a study is: fixed when it starts, checked when a worker joins or resumes it."""

    budget: int
    epochs: int
    space: str
    validation: int
    exact: bool
    overrides: tuple[str, ...]

    def as_attr(self, space: dict[str, Spec]) -> dict:
        """As stored with the study (JSON): the settings and the space's dimensions (and its
        layout, where fixed: studies from before `layout` existed searched theirs)."""
        return {**dataclasses.asdict(self), "overrides": list(self.overrides),
                "dimensions": {key: dataclasses.asdict(spec) if isinstance(spec, Range) else spec
                               for key, spec in space.items()
                               if not (key == "layout" and spec == "searched")}}


# Where each optional recipe dimension goes in the train section.
RECIPE_KEYS = {"momentum": ("momentum",), "nesterov": ("nesterov",),
               "weight_decay": ("weight_decay",), "pct_start": ("onecycle", "pct_start"),
               "div_factor": ("onecycle", "div_factor"),
               "final_div_factor": ("onecycle", "final_div_factor")}


class Unbuildable(ValueError):
    """A drawn layout whose unpadded convs shrink a feature map below their kernel."""


def propose(trial, space: dict[str, Spec], base: dict, settings: Settings) -> dict | None:
    """The trial's params (a params.yaml mapping), or None when its layout cannot fit the
    budget; Unbuildable when its layout cannot be built at all. Every dimension is drawn from
    the trial; the width comes from the budget. With `layout: fixed`, the model is the base
    params' own."""
    raw = copy.deepcopy(base)
    if space["layout"] == "searched":
        blocks = suggest(trial, "blocks", space["blocks"])
        layout = Layout(
            convs=tuple(suggest(trial, f"convs_{block + 1}", space["convs_per_block"])
                        for block in range(blocks)),
            growth=suggest(trial, "growth", space["growth"]),
            squeeze=suggest(trial, "squeeze", space["squeeze"]),
            head=suggest(trial, "head", space["head"]),
            dropout=suggest(trial, "dropout", space["dropout"]),
            tail=suggest(trial, "tail_convs", space["tail_convs"]) if "tail_convs" in space else 0,
            padding=suggest(trial, "padding", space["padding"]) if "padding" in space else None)
        why = unbuildable(layout, base["model"])
        if why is not None:
            raise Unbuildable(why)
        model = fit(layout, settings.budget, base["model"], settings.exact)
        if model is None:
            return None
        raw["model"] = model_section(model)
    raw["train"].update(lr=suggest(trial, "lr", space["lr"]),
                        batch_size=suggest(trial, "batch_size", space["batch_size"]),
                        epochs=settings.epochs, validation=settings.validation)
    raw["train"]["augment"].update(degrees=suggest(trial, "degrees", space["degrees"]),
                                   translate=suggest(trial, "translate", space["translate"]))
    for dimension, keys in RECIPE_KEYS.items():
        if dimension in space:
            *section, key = keys
            target = raw["train"][section[0]] if section else raw["train"]
            target[key] = suggest(trial, dimension, space[dimension])
    return raw


def model_section(model: Model) -> dict:
    """A model section as params.yaml writes it: layers without their default options."""
    section = model.model_dump(mode="json", exclude={"layers"})
    section["layers"] = [layer.model_dump(mode="json", exclude_defaults=True) for layer in model.layers]
    return section


def describe_trial(params: Params) -> str:
    convs = [shape.channels for shape in geometry.walk(params.model) if isinstance(shape.layer, ConvLayer)]
    recipe = params.train
    cycle = recipe.onecycle
    return (f"{geometry.parameter_count(params.model):,} parameters, {params.model.head} head, convs "
            f"{convs}, lr {recipe.lr:.3g}, batch {recipe.batch_size}, rotation "
            f"{recipe.augment.degrees:.1f}, shift {recipe.augment.translate:.3f}, momentum "
            f"{recipe.momentum:.3g}{' Nesterov' if recipe.nesterov else ''}, weight decay "
            f"{recipe.weight_decay:.3g}, OneCycle {cycle.pct_start:.3g}/{cycle.div_factor:.3g}/"
            f"{cycle.final_div_factor:.3g}")


@dataclass
class Worker:
    """One process taking part in a study: its data, its device, its MLflow runs."""

    study: Any  # optuna.Study
    settings: Settings
    space: dict[str, Spec]
    base: dict
    trials: int
    data: Any  # mnistlab.data.TrainingData
    dtype: Any
    client: Any  # mlflow.MlflowClient
    experiment_id: str
    parent_id: str
    device: str = "unknown device"  # as mnistlab.runtime.describe names it, e.g. "cpu: AMD EPYC (2 threads)"
    running: int | None = None  # the trial number in progress, for the stop message

    def run(self) -> None:
        """Ask for trials until the study has `trials` of them (finished or running)."""
        import optuna

        while True:
            # Ctrl-C and SIGTERM wait for every write to the study and to MLflow to end: raised
            # in the middle of one (a SQLAlchemy session, a lock held), they could leave it
            # half-done and the next write waiting on it. Only a training trial stops at once.
            trial = None
            try:
                with signals_deferred():  # a Ctrl-C here is raised once it has a trial
                    trial = self.next_trial()
                    self.running = None if trial is None else trial.number
                if trial is None:
                    break
                self.run_trial(trial)
            except BaseException:  # stopped before run_trial could say how: never left running
                if trial is not None:
                    with signals_deferred():
                        self.study.tell(trial, state=optuna.trial.TrialState.FAIL,
                                        skip_if_finished=True)
                raise
            self.running = None
            self.summarize()

    def next_trial(self):
        """A new trial of the study, or None when the study has all its trials."""
        import optuna

        # Optuna marks heartbeats experimental, and warns that they are meant for its own
        # optimize loop; this loop sends them itself (record_heartbeat).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(self.study)
            if counted(self.study) >= self.trials:
                return None
            trial = self.study.ask()
        heartbeat(self.study, trial)
        if counted(self.study, below=trial.number) >= self.trials:
            # Another worker asked at the same moment and took the last place.
            trial.set_user_attr("surplus", "the study was full when this trial began; not run")
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return None
        return trial

    def run_trial(self, trial) -> None:
        """Propose, count, train and score one trial; Optuna and MLflow both learn how it
        ended: complete, pruned (stopped early, over the budget, unbuildable or
        diverged) or failed."""
        import optuna

        from mnistlab.loop import TrainingDiverged

        State = optuna.trial.TrialState
        with signals_deferred():
            run_id = self.client.create_run(
                self.experiment_id, run_name=f"{self.study.study_name}-t{trial.number:03d}",
                tags={"mlflow.parentRunId": self.parent_id, STUDY_TAG: self.study.study_name,
                      "optuna_trial": str(trial.number), "device": self.device}).info.run_id
            trial.set_user_attr("mlflow_run_id", run_id)
            trial.set_user_attr("device", self.device)  # each worker can be another machine
        try:
            final = self.train_trial(trial, run_id)
        except optuna.TrialPruned as why:
            self.end_trial(trial, run_id, State.PRUNED, str(why))
        except TrainingDiverged as err:  # a bad draw, which the sampler should learn from
            trial.set_user_attr("diverged", str(err))
            self.end_trial(trial, run_id, State.PRUNED, f"diverged ({err})")
        except KeyboardInterrupt:
            self.end_trial(trial, run_id, State.FAIL, "interrupted", status="KILLED")
            raise
        except BaseException as err:
            self.end_trial(trial, run_id, State.FAIL, f"failed: {type(err).__name__}: {err}",
                           status="FAILED")
            raise
        else:
            self.client.log_metric(run_id, "final_val_accuracy", final)
            self.end_trial(trial, run_id, State.COMPLETE, f"final validation accuracy {final:.4f}",
                           value=final)

    def train_trial(self, trial, run_id: str) -> float:
        """The trial's final-epoch validation accuracy; raises TrialPruned to stop it early."""
        import optuna

        from mnistlab.loop import TrainingRun

        with signals_deferred():
            try:
                raw = propose(trial, self.space, self.base, self.settings)
            except Unbuildable as why:  # no width fits its shapes: never built
                trial.set_user_attr("unbuildable", str(why))
                raise optuna.TrialPruned(f"its layout cannot be built: {why}") from None
            finally:  # what was drawn, built or not
                self.client.log_batch(run_id, params=_params(trial.params))
            if raw is None:  # its layout is over the budget even at its narrowest: never built
                trial.set_user_attr("over_budget", True)
                raise optuna.TrialPruned(f"over the budget of {self.settings.budget:,} at any width")
            params = parse_params(raw)
            count = built_parameter_count(params)
            trial.set_user_attr("parameters", count)
            trial.set_user_attr("params", raw)  # what write_preset turns into a preset
            self.client.log_batch(run_id, params=_params(tracking.flatten(raw)))
            print(f"{PROG}: trial {trial.number}: {describe_trial(params)}", flush=True)
            if count > self.settings.budget:  # the check every model passes before it trains
                trial.set_user_attr("over_budget", True)
                raise optuna.TrialPruned(f"{count:,} parameters, over the budget")
        run = TrainingRun.start(params, self.data.train, self.data.holdout, self.dtype,
                                holdout_name=self.data.holdout_name)
        run.capture()
        for metrics in run.epochs():  # the only place a Ctrl-C stops the worker at once
            with signals_deferred():
                self.report_epoch(trial, run_id, metrics, params.train.epochs)
        return run.history[-1]["val_accuracy"]

    def report_epoch(self, trial, run_id: str, metrics: dict, epochs: int) -> None:
        """Log the epoch to MLflow and to Optuna; raise TrialPruned when the pruner says so."""
        import optuna
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, v, stamp, metrics["epoch"])
                                               for k, v in metrics.items() if k != "epoch"])
        trial.report(metrics["val_accuracy"], metrics["epoch"])
        heartbeat(self.study, trial)
        print(f"{PROG}: trial {trial.number} epoch {metrics['epoch']}/{epochs}: "
              f"validation accuracy {metrics['val_accuracy']:.4f} "
              f"({metrics['epoch_seconds']:.1f} s)", flush=True)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {metrics['epoch']}: behind the "
                                     f"median of the trials before it")

    def end_trial(self, trial, run_id: str, state, why: str, value: float | None = None,
                  status: str = "FINISHED") -> None:
        """Tell Optuna, then close the trial's MLflow run with the same state."""
        with signals_deferred():
            if value is None:
                self.study.tell(trial, state=state)
            else:
                self.study.tell(trial, value)
            name = state.name.lower()
            self.client.set_tag(run_id, "trial_state", name)
            self.client.set_terminated(run_id, status)
            print(f"{PROG}: trial {trial.number}: {name}: {why}", flush=True)

    def summarize(self, status: str | None = None) -> dict:
        """The study so far, as the parent run's metrics; the parent ends when it is full
        and nothing runs (or with `status`, when this worker stops early)."""
        with signals_deferred():
            summary = study_summary(self.study)
            self.client.log_batch(self.parent_id, metrics=_metrics(summary))
            if not summary["n_running"] and (status or counted(self.study) >= self.trials):
                self.client.set_terminated(self.parent_id, status or "FINISHED")
        return summary


def heartbeat(study, trial) -> None:
    """Tell the study this trial's worker is alive. Optuna's own optimize loop sends these
    from a thread; with ask and tell the storage's method is the only way."""
    record = getattr(study._storage, "record_heartbeat", None)  # none in memory: no workers
    if record is not None:
        record(trial._trial_id)


def close_stale_trial(_study, trial) -> None:
    """Optuna failed `trial`, whose worker stopped sending heartbeats: fail its MLflow run too."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        client = tracking.client()
        client.set_tag(run_id, "trial_state", "fail")
        client.set_tag(run_id, "stale", f"no heartbeat for {HEARTBEAT_GRACE_S} s: its worker stopped")
        client.set_terminated(run_id, "FAILED")
    print(f"{PROG}: trial {trial.number}: failed: its worker sent no heartbeat for "
          f"{HEARTBEAT_GRACE_S} s", flush=True)


def built_parameter_count(params: Params) -> int:
    """The trial's model built in torch and counted: the check every trial passes first."""
    from mnistlab.model import build_model, count_parameters

    count = count_parameters(build_model(params.model))
    assert count == geometry.parameter_count(params.model), "the shape walk and torch disagree"
    return count


def counted(study, below: int | None = None) -> int:
    """Trials that take a place in the study: finished (complete or pruned) or running."""
    import optuna

    State = optuna.trial.TrialState
    return sum(1 for t in study.get_trials(deepcopy=False, states=(State.COMPLETE, State.PRUNED, State.RUNNING))
               if below is None or t.number < below)


def study_summary(study) -> dict:
    import optuna

    State = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    by_state = {state: sum(1 for t in trials if t.state == state) for state in State}
    summary = {"n_complete": by_state[State.COMPLETE], "n_pruned": by_state[State.PRUNED],
               "n_failed": by_state[State.FAIL], "n_running": by_state[State.RUNNING]}
    if summary["n_complete"]:
        best = study.best_trial
        summary.update(best_val_accuracy=best.value, best_trial=best.number,
                       best_parameters=best.user_attrs["parameters"])
    return summary


def _params(values: dict) -> list:
    from mlflow.entities import Param

    return [Param(key, str(value)[:6000]) for key, value in values.items()]


def _metrics(values: dict) -> list:
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    return [Metric(key, float(value), stamp, 0) for key, value in values.items()]


# --- the winner as a preset -------------------------------------------------------------------

# Settings of the machine and the run, not of the recipe: never written into a preset.
RUN_SETTINGS = ("device", "validation", "limit_train", "limit_test", "resume")


def preset_marker(study_name: str) -> str:
    return f"# Written by `make search` (study {study_name}); edits are lost when it writes again."


def check_preset_is_ours(preset: str, study_name: str, presets_dir: Path = PRESETS_DIR) -> None:
    """A preset the study would overwrite must be one it wrote itself."""
    path = presets_dir / f"{preset}.yaml"
    if path.exists() and preset_marker(study_name) not in path.read_text().splitlines()[:2]:
        raise SearchError(f"PRESET={preset}: {path} exists and was not written by study "
                          f"{study_name}; pass another PRESET")


def write_preset(preset: str, trial, defaults: dict, settings: Settings, study_name: str,
                 train_images: int, presets_dir: Path = PRESETS_DIR) -> Path:
    """conf/preset/<preset>.yaml: the winning trial's model and every recipe setting that
    differs from conf/config.yaml. Like every preset it trains on all the training images
    (no validation split)."""
    from mnistlab.files import write_atomic

    params = trial.user_attrs["params"]
    train = changed({key: value for key, value in params["train"].items()
                     if key not in RUN_SETTINGS}, defaults["train"])
    header = "\n".join([
        "# @package _global_",  # Hydra reads this only on the first line
        preset_marker(study_name),
        f"# The best model of at most {settings.budget:,} parameters the search found: trial "
        f"{trial.number}, {trial.user_attrs['parameters']:,} parameters, final validation "
        f"accuracy {trial.value:.2%} after {settings.epochs} epochs on {train_images:,} "
        f"training images (the last {settings.validation:,} held out to score it).",
        f"# Space: conf/search/{settings.space}.yaml. Its test accuracy: `make repeats PRESETS={preset}`.",
    ])
    body = yaml.safe_dump({"base": {"preset": preset}, "model": params["model"], "train": train},
                          sort_keys=False, default_flow_style=None)
    path = presets_dir / f"{preset}.yaml"
    write_atomic(path, lambda f: f.write(f"{header}\n{body}".encode()))
    return path


def changed(values: dict, defaults: dict) -> dict:
    """The entries of `values` that differ from `defaults`, nested mappings compared key by key."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            if inner := changed(value, defaults[key]):
                out[key] = inner
        elif value != defaults.get(key):
            out[key] = value
    return out


# --- the command ------------------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line naming it and the options there are."""

    def error(self, message: str) -> None:  # type: ignore[override]
        options = ", ".join(a.option_strings[0] for a in self._actions
                            if a.option_strings and a.dest != "help")
        self.exit(2, f"{PROG}: error: {message} (options: {options})\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--budget", default="8000", help="most parameters a model may have (BUDGET)")
    parser.add_argument("--epochs", default="15", help="epochs every trial trains (EPOCHS)")
    parser.add_argument("--trials", default="40", help="trials in the whole study, all workers together (TRIALS)")
    parser.add_argument("--space", default="default", help="conf/search/<SPACE>.yaml")
    parser.add_argument("--study", help="the study's name (STUDY; default: from budget, space, epochs)")
    parser.add_argument("--preset", help="the winner's conf/preset/<PRESET>.yaml (default: from budget and space)")
    parser.add_argument("--exact", action="store_true", help="every model has exactly BUDGET parameters")
    parser.add_argument("--validation", default="10000", help="training images held out to score trials")
    parser.add_argument("--seed", default=None, help="the sampler's random seed (one worker: a repeatable study)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params override for every trial (dvc exp run -S syntax)")
    args = parser.parse_args(argv)
    for option, least in (("budget", 1), ("epochs", 1), ("trials", 1), ("validation", 1), ("seed", 0)):
        value = getattr(args, option)
        if value is None:
            continue
        if not value.isdigit() or int(value) < least:
            raise SearchError(f"{option.upper()}={value!r}: should be a whole number of at least {least}")
        setattr(args, option, int(value))
    if args.validation >= TRAIN_IMAGES:
        raise SearchError(f"VALIDATION={args.validation}: should be less than the "
                          f"{TRAIN_IMAGES:,} training images")
    suffix = "" if args.space == "default" else f"_{args.space}"
    args.study = args.study or f"search{args.budget}{suffix}-e{args.epochs}"
    args.preset = args.preset or f"search{args.budget}{suffix}"
    if not re.fullmatch(r"[\w.-]{1,64}", args.study):
        raise SearchError(f"STUDY={echo(args.study)}: should be letters, digits, '_', '.' or '-'")
    if not re.fullmatch(r"[A-Za-z0-9][\w.]{0,63}", args.preset):  # no '-': repeats add -s<seed>
        raise SearchError(f"PRESET={echo(args.preset)}: should be letters, digits, '_' or '.'")
    return args


def storage_url() -> str:
    """SEARCH_STORAGE, or search.db at the repo root. postgresql:// means psycopg 3 (the
    driver this project installs; SQLAlchemy would otherwise look for psycopg2)."""
    url = os.environ.get("SEARCH_STORAGE") or f"sqlite:///{tracking.project_root() / 'search.db'}"
    return "postgresql+psycopg://" + url.removeprefix("postgresql://") if url.startswith("postgresql://") else url


# Tables of MLflow's tracking store. Optuna must not put its own next to them: both keep their
# schema's version in a table named alembic_version, so each would take the other's for its own.
MLFLOW_TABLES = {"experiments", "runs", "metrics"}


def same_database(first: str, second: str) -> bool:
    """Whether two SQLAlchemy URLs name one database, whatever the driver or the spelling of
    a sqlite path."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        a, b = make_url(first), make_url(second)
    except (ArgumentError, ValueError):
        return first == second
    if a.get_backend_name() != b.get_backend_name():
        return False
    if a.get_backend_name() == "sqlite":
        return bool(a.database and b.database) and Path(a.database).resolve() == Path(b.database).resolve()
    return ((a.host, a.port, a.database, dict(a.query))
            == (b.host, b.port, b.database, dict(b.query)))


def storage_tables(url: str) -> set[str]:
    """The tables the storage's database holds already, read without creating or writing
    anything (a sqlite file that is not there yet holds none)."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    if url.startswith("sqlite:///"):
        import sqlite3

        path = Path(sqlalchemy.engine.make_url(url).database or "")
        if not path.is_file():
            return set()
        with sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True) as db:
            return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    options = {} if url.startswith("sqlite") else {"connect_timeout": 10}
    engine = sqlalchemy.create_engine(url, connect_args=options, poolclass=NullPool)
    try:
        return set(sqlalchemy.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def check_storage(url: str) -> None:
    """Refuse MLflow's own database as the study's storage, before anything is created in it:
    the tracking store's URI, or any database that already holds MLflow's tables."""
    if same_database(url, tracking.tracking_uri()):
        raise SearchError(tracking.redact(f"SEARCH_STORAGE={url}: the database of MLflow's "
                                          f"tracking store; the study needs one of its own "
                                          f"(unset, it is search.db at the repo root)"))
    try:
        tables = storage_tables(url)
    except Exception as err:  # noqa: BLE001 - any failure here means "no storage"
        cause = getattr(err, "orig", None) or err  # the driver's message, not SQLAlchemy's
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise SearchError(tracking.redact(f"SEARCH_STORAGE={url}: cannot open the study's "
                                          f"storage: {first}")) from None
    if MLFLOW_TABLES <= tables:
        raise SearchError(tracking.redact(f"SEARCH_STORAGE={url}: holds MLflow's tables (a "
                                          f"tracking store's database); the study needs one of "
                                          f"its own (unset, it is search.db at the repo root)"))


def open_storage(url: str):
    """Optuna's storage at `url`, its tables created on first use. Workers that start together
    on a new database race to create the tables; the loser sees them exist and tries again."""
    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    options = ({"connect_args": {"timeout": 60}} if url.startswith("sqlite") else
               {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True})
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental
                warnings.simplefilter("ignore")
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=options, heartbeat_interval=60,
                    grace_period=HEARTBEAT_GRACE_S, heartbeat_stale_trial_callback=close_stale_trial)
        except (IntegrityError, ProgrammingError):  # another worker is creating the tables
            if attempt == 4:
                raise
            time.sleep(1 + attempt)
        except Exception as err:  # noqa: BLE001 - any other failure here means "no storage"
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise SearchError(tracking.redact(f"SEARCH_STORAGE={url}: cannot open the study's "
                                              f"storage: {first}")) from None


def open_study(storage, args, settings: Settings, space: dict):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # TPE draws its first trials at random, and the pruner lets those same trials finish: each
    # of TPE's proposals is then judged against the median of a whole random sample of the
    # space, not of the first three trials, which cut every proposal of I3's layout study.
    startup = max(3, min(10, args.trials // 4))
    sampler = optuna.samplers.TPESampler(seed=args.seed, n_startup_trials=startup)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=max(1, args.epochs // 3))
    study = optuna.create_study(storage=storage, study_name=args.study, direction="maximize",
                                sampler=sampler, pruner=pruner, load_if_exists=True)
    wanted = settings.as_attr(space)
    found = study.user_attrs.get("settings")
    if found is None:
        study.set_user_attr("settings", wanted)
    elif found != wanted:
        differs = [key for key in wanted if found.get(key) != wanted[key]]
        raise SearchError(f"STUDY={args.study} was started with other settings ("
                          + ", ".join(f"{key}: {echo(found.get(key))}, now {echo(wanted[key])}"
                                      for key in differs)
                          + "); repeat its settings or pass another STUDY")
    return study


def parent_run(client, experiment_id: str, study, settings: Settings) -> str:
    """The study's MLflow parent run. Workers that start together each create one, then all
    keep the oldest and delete their own if it is not: so one study has one parent."""
    filter_string = f"tags.{STUDY_TAG} = '{study.study_name}' and tags.search_parent = 'true'"
    if not client.search_runs([experiment_id], filter_string, max_results=1):
        mine = client.create_run(experiment_id, run_name=study.study_name,
                                 tags={STUDY_TAG: study.study_name, "search_parent": "true"}).info.run_id
        client.log_batch(mine, params=_params(dataclasses.asdict(settings)))
        oldest = client.search_runs([experiment_id], filter_string,
                                    order_by=["attributes.start_time ASC", "attributes.run_id ASC"])[0]
        if oldest.info.run_id != mine:
            client.delete_run(mine)
    parent = client.search_runs([experiment_id], filter_string,
                                order_by=["attributes.start_time ASC", "attributes.run_id ASC"])[0]
    if parent.info.status != "RUNNING":  # a study continued, or extended with more trials
        client.update_run(parent.info.run_id, status="RUNNING")
    return parent.info.run_id


def main(argv: Sequence[str] | None = None) -> None:
    # Options, space, params and budget are checked before torch is even imported (seconds).
    try:
        args = parse_args(argv)
        space = load_space(args.space)
        settings = Settings(args.budget, args.epochs, args.space, args.validation, args.exact,
                            tuple(args.set))
        defaults = compose()
        base = compose(overrides=args.set)
        base_params = parse_params(base)  # a bad --set is refused here
        least, layout = smallest_model(space, base["model"])
        if args.budget < least:
            what = (f"the fixed layout of preset {base['base']['preset']}" if layout is None else
                    f"{len(layout.convs)} blocks, {layout.head} head, width {MIN_WIDTH}")
            raise SearchError(f"BUDGET={args.budget}: below the smallest model space "
                              f"{args.space} can build ({least:,} parameters: {what}); use at "
                              f"least {least:,}")
        check_preset_is_ours(args.preset, args.study)
        check_storage(storage_url())
    except (SearchError, ParamsError) as err:
        sys.exit(f"{PROG}: error: {err}")
    from mnistlab.data import DataError, load_training_data
    from mnistlab import runtime

    try:
        setup = runtime.setup(base_params)
        recipe = base_params.train.model_copy(update={"validation": args.validation})
        data = load_training_data(recipe, setup.device, verify_md5=base_params.data.verify_md5)
        storage = open_storage(storage_url())
        experiment_id = tracking.connect(EXPERIMENT)
        study = open_study(storage, args, settings, space)
    except (SearchError, ParamsError, DataError, tracking.TrackingError) as err:
        sys.exit(f"{PROG}: error: {err}")
    client = tracking.client()
    worker = Worker(study, settings, space, base, args.trials, data, setup.dtype, client,
                    experiment_id, parent_run(client, experiment_id, study, settings),
                    setup.name)
    print(f"{PROG}: study {args.study} ({counted(study)} of {args.trials} trials so far) in "
          f"{tracking.redact(storage_url())}; {len(data.train):,} training and "
          f"{len(data.holdout):,} validation images on {worker.device}; MLflow parent run "
          f"{worker.parent_id}", flush=True)
    # SIGINT too: a worker started in the background by a script inherits SIGINT ignored,
    # and Python then installs no Ctrl-C handler of its own, so `kill -INT` did nothing.
    previous = {sig: signal.signal(sig, raise_keyboard_interrupt)
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker.run()
    except KeyboardInterrupt:
        summary = worker.summarize(status="KILLED")
        done = summary["n_complete"] + summary["n_pruned"]
        failed = "" if worker.running is None else f"trial {worker.running} is marked failed, "
        sys.exit(f"{PROG}: stopped; {failed}{done} of {args.trials} trials are done and kept; "
                 f"the same command continues the study")
    finally:  # called as a function (the tests do), it leaves the caller's handlers as they were
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    summary = worker.summarize()
    print(f"{PROG}: {summary['n_complete']} complete, {summary['n_pruned']} pruned, "
          f"{summary['n_failed']} failed, {summary['n_running']} still running elsewhere")
    if summary["n_complete"] and counted(study) >= args.trials:
        best = study.best_trial
        path = write_preset(args.preset, best, defaults, settings, args.study, len(data.train))
        print(f"{PROG}: best: trial {best.number}, final validation accuracy {best.value:.4f}, "
              f"{best.user_attrs['parameters']:,} parameters; written to {path}; its test accuracy: "
              f"`git add {path} && make repeats PRESETS={args.preset}` (DVC's experiments "
              f"see only the files git knows)")


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()
