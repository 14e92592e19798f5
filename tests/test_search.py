"""`make search` (tools/search.py): a budget that is kept, a validation split that keeps the
test set out of every choice, a study tracked in MLflow and written out as a preset, one
that survives Ctrl-C, and two workers sharing one study in a real PostgreSQL.

* the space files and the budget, without training: every model is within the budget (and
  exactly on it with --exact), the widest that fits, and a layout that cannot fit never
  trains;
* bad options, budgets, spaces and storages are refused in one line before any trial, and
  leave no study and no MLflow store behind;
* end to end on tiny data, in a copy of the repo: a study whose project has no test files
  at all, its MLflow parent and children, the winner as a preset that `dvc exp run` trains;
  a study stopped by Ctrl-C and continued; two workers at once on a PostgreSQL study.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import mlflow
import optuna
import pytest
import torch
import yaml
from helpers import REPO
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import BIN, tiny_project

from mnistlab import geometry
from mnistlab.model import build_model, count_parameters
from mnistlab.config import compose, parse_params
from tools import search, search_space
from tools.search_space import Layout, Range, SearchError, fit, load_space, smallest_model, widest

MODEL_BASE = compose(conf=REPO / "conf")["model"]

# --- the search space -------------------------------------------------------------------------


def test_every_shipped_space_loads():
    for path in (REPO / "conf/search").glob("*.yaml"):
        space = load_space(path.stem, REPO / "conf/search")
        given = set(space) - {"layout"} - set(search_space.OPTIONAL_DIMENSIONS)
        layout = set(search_space.LAYOUT_DIMENSIONS) if space["layout"] == "fixed" else set()
        assert given | layout == set(search_space.DIMENSIONS), path
    default = load_space("default", REPO / "conf/search")
    assert default["lr"] == Range(0.05, 0.5, log=True)
    assert default["head"] == ["fc", "gap"]
    i3 = load_space("I3", REPO / "conf/search")
    assert (i3["head"], i3["lr"], i3["batch_size"], i3["dropout"]) == ("gap", 0.2, 256, 0.05)


def test_the_recipe_space_fixes_the_layout_and_draws_what_readme_004_leaves_open():
    space = load_space("I3_recipe", REPO / "conf/search")
    assert space["layout"] == "fixed"
    assert not set(search_space.LAYOUT_DIMENSIONS) & set(space)
    assert (space["lr"], space["batch_size"], space["degrees"], space["translate"]) == (0.2, 256, 10.0, 0.05)
    assert space["momentum"] == Range(0.8, 0.95) and space["nesterov"] == [True, False]
    assert 0.0 in space["weight_decay"] and isinstance(space["pct_start"], Range)


def test_a_fixed_layout_trains_the_presets_model_with_the_drawn_recipe():
    base = compose(conf=REPO / "conf", overrides=["preset=I3"])
    space = load_space("I3_recipe", REPO / "conf/search")
    trial = optuna.trial.FixedTrial({"momentum": 0.85, "nesterov": False, "weight_decay": 1e-4,
                                     "pct_start": 0.2, "div_factor": 10.0, "final_div_factor": 100.0})
    raw = search.propose(trial, space, base, search.Settings(14_500, 15, "I3_recipe", 10_000, False, ()))
    assert raw["model"] == base["model"]  # the layout, channels and head of conf/preset/I3.yaml
    train = raw["train"]
    assert (train["momentum"], train["nesterov"], train["weight_decay"]) == (0.85, False, 1e-4)
    assert train["onecycle"] == {"pct_start": 0.2, "div_factor": 10.0, "final_div_factor": 100.0}
    assert (train["lr"], train["batch_size"], train["epochs"], train["validation"]) == (0.2, 256, 15, 10_000)
    assert search.built_parameter_count(parse_params(raw)) == 14_500
    assert smallest_model(space, base["model"]) == (14_500, None)


def test_a_searched_layout_keeps_the_params_recipe_where_the_space_leaves_it_out():
    base = compose(conf=REPO / "conf")
    space = load_space("default", REPO / "conf/search")
    trial = optuna.trial.FixedTrial({"blocks": 2, "convs_1": 1, "convs_2": 1, "growth": 1.5,
                                     "squeeze": 0.5, "head": "gap", "dropout": 0.0, "lr": 0.1,
                                     "batch_size": 128, "degrees": 5.0, "translate": 0.05})
    raw = search.propose(trial, space, base, search.Settings(3000, 2, "default", 256, False, ()))
    for key in ("momentum", "nesterov", "weight_decay", "onecycle"):
        assert raw["train"][key] == base["train"][key]


def test_the_report_reads_a_fixed_layout_from_the_model_and_lists_the_drawn_recipe():
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from tools.search_report import table

    base = compose(conf=REPO / "conf", overrides=["preset=I3"])
    found = optuna.create_study(direction="maximize")
    found.set_user_attr("settings", {"space": "I3_recipe", "exact": False, "budget": 14_500,
                                     "epochs": 15, "validation": 10_000})
    found.add_trial(optuna.trial.create_trial(
        params={"momentum": 0.85, "nesterov": False},
        distributions={"momentum": FloatDistribution(0.8, 0.95),
                       "nesterov": CategoricalDistribution([True, False])},
        value=0.995, intermediate_values={15: 0.995},
        user_attrs={"params": base, "parameters": 14_500, "device": "cpu"}))
    row = table(found)[-1]
    assert row == ("| 0 | complete | 2 + 4 unpadded | 13, 16, 16, 20, 18, 24 | momentum 0.85, nesterov false | "
                   "14,500 | 1 | 99.50% |")


def write_space(folder: Path, **changes) -> Path:
    raw = yaml.safe_load((REPO / "conf/search/default.yaml").read_text())
    for key, value in changes.items():
        if value is None:
            del raw[key]
        else:
            raw[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trial.yaml").write_text(yaml.safe_dump(raw))
    return folder


@pytest.mark.bad_input
@pytest.mark.parametrize("changes, message", [
    ({"depth": [2, 3]}, "unknown key 'depth'; a space gives each of blocks, convs_per_block"),
    ({"lr": None}, "missing key 'lr'"),
    ({"lr": {"low": 0.5, "high": 0.05}}, "lr = {'high': 0.05, 'low': 0.5}: needs low <= high"),
    ({"lr": {"low": 0.0, "high": 0.5, "log": True}}, "needs low <= high and low > 0 on a log scale"),
    ({"lr": {"low": 0.1}}, "a range is {low: a, high: b}"),
    ({"blocks": ["two"]}, "blocks = ['two']: values should be ints"),
    ({"head": {"low": 1, "high": 2}}, "this dimension takes a list of choices"),
    ({"batch_size": []}, "a list of choices needs at least one"),
    ({"layout": "random"}, "layout = 'random': should be one of searched, fixed"),
    ({"layout": "fixed"}, "'blocks' is a layout dimension, and layout = fixed trains the model"),
    ({"nesterov": ["yes"]}, "nesterov = ['yes']: values should be true or false"),
    ({"nesterov": {"low": 0, "high": 1}}, "nesterov = {'high': 1, 'low': 0}: a range is"),
    ({"momentum": "high"}, "momentum = 'high': values should be numbers"),
    ({"padding": ["same", "diagonal"]}, "padding = ['same', 'diagonal']: should be one or more of same, valid"),
    ({"tail_convs": -1}, "tail_convs = -1: should be 0 or more"),
    ({"layout": "fixed", **dict.fromkeys(search_space.LAYOUT_DIMENSIONS), "padding": "valid"},
     "'padding' is a layout dimension, and layout = fixed trains the model"),
    ({"padding": "valid", "blocks": 3, "convs_per_block": 3},
     "cannot be built: layers.8 (conv: 2) on a 2x2 feature map: kernel 3 with padding 0 does not fit"),
])
def test_a_bad_space_file_is_explained(tmp_path, changes, message):
    with pytest.raises(SearchError, match=re.escape(message)):
        space = load_space("trial", write_space(tmp_path, **changes))
        smallest_model(space, MODEL_BASE)  # what the search checks next, before any trial


@pytest.mark.bad_input
def test_an_unknown_space_names_the_known_ones():
    with pytest.raises(SearchError, match="SPACE='nope': no such search space; use one of I3, I3_recipe, default, unpadded"):
        load_space("nope", REPO / "conf/search")


layouts = st.builds(
    Layout, convs=st.lists(st.integers(1, 3), min_size=2, max_size=3).map(tuple),
    growth=st.floats(1.0, 2.0), squeeze=st.floats(0.4, 1.0), head=st.sampled_from(["fc", "gap"]),
    dropout=st.sampled_from([0.0, 0.05]))


@settings(max_examples=40, deadline=None)
@given(layout=layouts, budget=st.integers(2_000, 20_000))
def test_every_model_is_the_widest_within_the_budget(layout, budget):
    model = fit(layout, budget, MODEL_BASE, exact=False)
    width = widest(layout, budget, MODEL_BASE)
    if model is None:  # only a layout over the budget at its narrowest
        assert geometry.parameter_count(search_space.build_section(layout, search_space.MIN_WIDTH, MODEL_BASE)) > budget
        return
    assert geometry.parameter_count(model) <= budget
    # A hair wider and it is over: the budget is used, not just respected.
    assert geometry.parameter_count(search_space.build_section(layout, width + 0.01, MODEL_BASE)) > budget


@settings(max_examples=15, deadline=None)
@given(layout=layouts, budget=st.sampled_from([5_000, 8_000, 14_500]))
def test_with_exact_every_model_has_exactly_the_budget(layout, budget):
    model = fit(layout, budget, MODEL_BASE, exact=True)
    assert model is None or geometry.parameter_count(model) == budget
    if model is not None:  # and torch agrees with the shape walk
        assert search.built_parameter_count(parse_params({**compose(conf=REPO / "conf"),
                                                          "model": search.model_section(model)})) == budget


def test_an_unpadded_layout_can_end_with_convs_after_its_last_transition():
    # README 001's shape: one block of two unpadded convs, a transition, four more convs, GAP.
    layout = Layout((2,), growth=1.0, squeeze=1.0, head="gap", dropout=0.05, tail=4, padding="valid")
    model = search_space.build_section(layout, 12, MODEL_BASE)
    assert model.padding == "valid" and MODEL_BASE["padding"] == "same"
    assert [(shape.channels, shape.size) for shape in geometry.walk(model)] == [
        (12, 26), (12, 24), (12, 12), (12, 12), (12, 10), (12, 8), (12, 6), (12, 4)]
    exact = fit(layout, 5_000, MODEL_BASE, exact=True)
    assert geometry.parameter_count(exact) == 5_000 and exact.padding == "valid"
    # Left out of a space, the two dimensions change nothing: the params' padding, no tail.
    plain = Layout((2, 2), 1.5, 0.5, "gap", 0.05)
    assert search_space.build_section(plain, 8, MODEL_BASE) == search_space.build_section(
        Layout((2, 2), 1.5, 0.5, "gap", 0.05, tail=0, padding="same"), 8, MODEL_BASE)


UNPADDED = {"padding": "valid", "tail_convs": [2, 3, 4], "head": "gap"}


def test_the_smallest_model_skips_unpadded_layouts_that_cannot_be_built(tmp_path):
    # Three unpadded blocks leave a 1x1 map (28, 26, 13, 11, 5, 3, 1): no tail fits after them.
    space = load_space("trial", write_space(tmp_path, **UNPADDED, blocks=[1, 3]))
    assert "on a 1x1 feature map" in search_space.unbuildable(
        Layout((1, 1, 1), 1.0, 0.4, "gap", 0.0, tail=2, padding="valid"), MODEL_BASE)
    least, layout = smallest_model(space, MODEL_BASE)
    assert (layout.convs, layout.tail, layout.padding) == ((1,), 2, "valid")
    assert least == geometry.parameter_count(search_space.build_section(layout, search_space.MIN_WIDTH, MODEL_BASE))
    # The shipped unpadded space: one block, then a tail, every layout of it builds.
    shipped = load_space("unpadded", REPO / "conf/search")
    assert all(search_space.unbuildable(Layout((convs,), 2.0, 1.0, "gap", 0.0, tail, "valid"),
                                        MODEL_BASE) is None
               for convs in shipped["convs_per_block"] for tail in shipped["tail_convs"])


def test_the_smallest_model_of_the_default_space():
    least, layout = smallest_model(load_space("default", REPO / "conf/search"), MODEL_BASE)
    # two blocks of one 2-channel conv, transitions to 1 channel, GAP onto 10 classes
    assert (layout.convs, layout.head) == ((1, 1), "gap")
    assert least == geometry.parameter_count(search_space.build_section(layout, search_space.MIN_WIDTH, MODEL_BASE))


@pytest.mark.parametrize("trials, random_trials", [(3, 3), (8, 3), (12, 3), (20, 5), (40, 10), (200, 10)])
def test_the_pruner_spares_exactly_the_samplers_random_trials(trials, random_trials):
    # TPE's first trials are a random sample of the space; a pruner that judged them against
    # each other (or started later) would cut TPE's proposals against too few, or no, trials.
    args = search.parse_args(["--trials", str(trials), "--epochs", "15"])
    settings_ = search.Settings(8000, 15, "default", 10_000, False, ())
    study = search.open_study(optuna.storages.InMemoryStorage(), args, settings_,
                              load_space("default", REPO / "conf/search"))
    assert study.sampler._n_startup_trials == random_trials
    assert study.pruner._n_startup_trials == random_trials
    assert study.pruner._n_warmup_steps == 5


def test_a_trial_whose_worker_died_is_failed_and_its_place_freed(tmp_path, monkeypatch):
    monkeypatch.setattr(search, "HEARTBEAT_GRACE_S", 1)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    found = optuna.create_study(storage=search.open_storage(f"sqlite:///{tmp_path / 's.db'}"),
                                study_name="s")
    trial = found.ask()
    trial.set_user_attr("mlflow_run_id", run_id)
    found._storage.record_heartbeat(trial._trial_id)  # then its worker is killed
    assert search.counted(found) == 1
    time.sleep(2.5)
    optuna.storages.fail_stale_trials(found)  # what every worker does before it asks
    assert found.trials[0].state == optuna.trial.TrialState.FAIL and search.counted(found) == 0
    run_ = client.get_run(run_id)
    assert run_.info.status == "FAILED" and run_.data.tags["trial_state"] == "fail"


def run_one_untrainable_trial(tmp_path, monkeypatch, space: dict, budget: int, drawn: dict):
    """A worker's run of one enqueued trial that must never train: the trial and its MLflow run."""
    import mnistlab.loop

    def no_training(*args, **kwargs):
        raise AssertionError("a trial that should never train started training")

    monkeypatch.setattr(mnistlab.loop.TrainingRun, "start", no_training)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("e")
    parent_id = client.create_run(experiment_id).info.run_id
    found = optuna.create_study(direction="maximize")
    found.enqueue_trial({**drawn, "lr": 0.1, "batch_size": 64, "degrees": 0.0, "translate": 0.0})
    settings_ = search.Settings(budget, 2, "trial", 256, False, ())
    worker = search.Worker(found, settings_, space, compose(conf=REPO / "conf"), 1, None,
                           torch.float32, client, experiment_id, parent_id)
    worker.run()
    (trial,) = found.trials
    run_ = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert run_.data.tags["trial_state"] == "pruned" and not run_.data.metrics
    return trial, run_


def test_a_layout_over_the_budget_is_counted_and_never_trained(tmp_path, monkeypatch):
    # Three blocks of three convs and an FC head: over 400 parameters even 2 channels wide.
    space = load_space("default", REPO / "conf/search")
    trial, _ = run_one_untrainable_trial(tmp_path, monkeypatch, space, 400, {
        "blocks": 3, "convs_1": 3, "convs_2": 3, "convs_3": 3, "growth": 2.0, "squeeze": 1.0,
        "head": "fc", "dropout": 0.0})
    assert trial.user_attrs["over_budget"]


def test_an_unpadded_layout_that_cannot_be_built_is_pruned_naming_the_layer(tmp_path, monkeypatch):
    space = load_space("trial", write_space(tmp_path / "spaces", **UNPADDED, blocks=[1, 2],
                                            convs_per_block=[1, 2]))
    trial, run_ = run_one_untrainable_trial(tmp_path, monkeypatch, space, 5_000, {
        "blocks": 2, "convs_1": 2, "convs_2": 2, "tail_convs": 2, "growth": 1.0,
        "squeeze": 1.0, "dropout": 0.0})
    assert "on a 2x2 feature map: kernel 3 with padding 0 does not fit" in trial.user_attrs["unbuildable"]
    assert "over_budget" not in trial.user_attrs and "parameters" not in trial.user_attrs
    assert run_.data.params["tail_convs"] == "2"  # what was drawn is logged all the same


# --- tiny projects ----------------------------------------------------------------------------


def search_cmd(*args: str) -> list[str]:
    return [str(BIN / "python"), "-m", "tools.search", "--epochs", "2", "--validation", "256",
            "--budget", "3000", *args]


def env(project: Path, **extra: str) -> dict:
    values = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "SEARCH_"))}
    values["PATH"] = f"{BIN}{os.pathsep}{values['PATH']}"
    return {**values, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", **extra}


def study(project: Path, name: str, storage: str | None = None) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage or f"sqlite:///{project / 'search.db'}")


def search_runs(project: Path, study_name: str) -> tuple[object, list]:
    """The study's MLflow parent run and its children (trials), oldest first."""
    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    found = mlflow.search_runs(experiment_names=[search.EXPERIMENT], output_format="list",
                               filter_string=f"tags.{search.STUDY_TAG} = '{study_name}'",
                               order_by=["attributes.start_time ASC"])
    (parent,) = [r for r in found if r.data.tags.get("search_parent") == "true"]
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(found) - 1  # every other run of the study is one of its trials
    return parent, children


def trained_trials(stdout: str) -> set[int]:
    """The trials a worker's output says it finished (complete or pruned)."""
    return {int(match[1]) for match in re.finditer(r"^tools\.search: trial (\d+): (complete|pruned):",
                                                   stdout, re.MULTILINE)}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return tiny_project(tmp_path_factory.mktemp("search"))


@pytest.fixture(scope="module")
def untouched_project(tmp_path_factory) -> Path:
    """A tiny project in which every command is refused, so nothing may appear in it."""
    return tiny_project(tmp_path_factory.mktemp("refused"))


@pytest.mark.slow
@pytest.mark.bad_input
@pytest.mark.parametrize("args, extra_env, message", [
    (["--budget", "abc"], {}, "BUDGET='abc': should be a whole number of at least 1"),
    (["--budget", "50"], {}, "BUDGET=50: below the smallest model space default can build (74 "
                             "parameters: 2 blocks, gap head, width 2); use at least 74"),
    (["--trials", "0"], {}, "TRIALS='0': should be a whole number of at least 1"),
    (["--epochs", "-1"], {}, "EPOCHS='-1': should be a whole number of at least 1"),
    (["--depth", "3"], {}, "unrecognized arguments: --depth 3 (options: --budget, --epochs, --trials"),
    (["--space", "nope"], {}, "SPACE='nope': no such search space; use one of I3, I3_recipe, default"),
    (["--space", "I3_recipe", "--set", "preset=I3"], {}, "BUDGET=3000: below the smallest model "
     "space I3_recipe can build (14,500 parameters: the fixed layout of preset I3); use at least 14,500"),
    (["--preset", "I1"], {}, "PRESET=I1: conf/preset/I1.yaml exists and was not written by study"),
    (["--set", "train.lr=-1"], {}, "train.lr = -1: Input should be greater than 0"),
    ([], {"SEARCH_STORAGE": "postgresql://nobody:secret@127.0.0.1:9/optuna"},
     "SEARCH_STORAGE=postgresql+psycopg://nobody:***@127.0.0.1:9/optuna: cannot open the study's storage"),
])
def test_bad_input_is_refused_before_any_trial(untouched_project, args, extra_env, message,
                                               monkeypatch, capsys):
    # In this process, as `python -m tools.search` runs it (a subprocess each would cost
    # seconds of start-up): the same main(), from the project's root.
    project = untouched_project
    monkeypatch.chdir(project)
    monkeypatch.delenv("SEARCH_STORAGE", raising=False)
    for key, value in {"MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}", **extra_env}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as stopped:
        search.main(search_cmd(*args)[3:])
    said = stopped.value.code if isinstance(stopped.value.code, str) else capsys.readouterr().err
    assert said.startswith(f"tools.search: error: {message}"), said
    assert len(said.strip().splitlines()) == 1, said
    assert "secret" not in said
    # Nothing was started: no study, no MLflow store.
    assert not (project / "search.db").exists() and not (project / "mlflow.db").exists()


def tables(path: Path) -> set[str]:
    import sqlite3

    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


@pytest.mark.bad_input
@pytest.mark.parametrize("storage", ["the tracking store", "a database with MLflow's tables"])
def test_mlflows_own_database_is_refused_as_the_studys_storage(tmp_path, monkeypatch, storage):
    """Optuna's tables in MLflow's database would share its alembic_version table (each
    would read the other's schema version as its own): refused before anything is created
    in it, and before any data is read, whether it is the tracking store this search logs
    to (the same file, however spelled) or any other store (a team server's)."""
    from mnistlab import data

    def went_on(*args, **kwargs):
        raise AssertionError("the search went on past its storage check")

    monkeypatch.setattr(data, "load_training_data", went_on)
    monkeypatch.chdir(REPO)  # read only: the params, the space, the presets
    tracking_db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tracking_db}")
    if storage == "the tracking store":  # not created yet: the search would create it
        url, expected = f"sqlite:///{tmp_path}/./mlflow.db", "the database of MLflow's tracking store"
        server_db = None
    else:
        server_db = tmp_path / "server.db"
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{server_db}").search_experiments()
        url, expected = f"sqlite:///{server_db}", "holds MLflow's tables (a tracking store's database)"
        before = tables(server_db)
    monkeypatch.setenv("SEARCH_STORAGE", url)
    with pytest.raises(SystemExit) as stopped:
        search.main(["--budget", "3000", "--epochs", "1", "--trials", "1", "--study", "refused",
                     "--preset", "refused_storage"])
    assert stopped.value.code == (f"tools.search: error: SEARCH_STORAGE={url}: {expected}; the "
                                  f"study needs one of its own (unset, it is search.db at the repo "
                                  f"root)")
    assert not tracking_db.exists()
    if server_db is not None:
        assert tables(server_db) == before and "studies" not in before


@pytest.mark.parametrize("first, second, same", [
    ("sqlite:////a/mlflow.db", "sqlite:////a/./mlflow.db", True),
    ("sqlite:////a/mlflow.db", "sqlite:////a/search.db", False),
    ("postgresql://u:p@h:5432/db", "postgresql+psycopg://other@h:5432/db", True),  # user, driver
    ("postgresql+psycopg://u@h/mlflow", "postgresql+psycopg://u@h/optuna", False),
    ("postgresql+psycopg://u@/db?host=/run/pg", "postgresql+psycopg://u@/db?host=/tmp/pg", False),
    ("sqlite:////a/mlflow.db", "http://127.0.0.1:5000", False),
])
def test_which_urls_name_one_database(first, second, same):
    assert search.same_database(first, second) is same


@pytest.fixture(scope="module")
def tiny_study(project) -> subprocess.CompletedProcess:
    """`make search` of 4 trials (study tiny-study, preset tinybest) in `project`, with the
    test files not there at all while it runs."""
    raw = project / "data/MNIST/raw"
    hidden = project / "hidden"
    hidden.mkdir()
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.move(raw / name, hidden / name)
    out = subprocess.run(search_cmd("--trials", "4", "--study", "tiny-study", "--preset", "tinybest",
                                    "--seed", "0"),
                         cwd=project, env=env(project), capture_output=True, text=True, timeout=600)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        shutil.move(hidden / name, raw / name)
    return out


@pytest.mark.slow
def test_a_study_never_reads_a_test_image_and_its_winner_is_a_preset(project, tiny_study, monkeypatch,
                                                                    capsys):
    out = tiny_study
    assert out.returncode == 0, out.stdout + out.stderr
    assert "768 training and 256 validation images" in out.stdout

    found = study(project, "tiny-study")
    states = [t.state for t in found.trials]
    assert len(states) == 4 and set(states) <= {optuna.trial.TrialState.COMPLETE,
                                                optuna.trial.TrialState.PRUNED}
    for trial in found.trials:
        if "params" in trial.user_attrs:  # every trained model was counted within the budget
            assert trial.user_attrs["parameters"] <= 3000
            assert trial.user_attrs["params"]["train"]["validation"] == 256

    parent, children = search_runs(project, "tiny-study")
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["n_complete"] + parent.data.metrics["n_pruned"] == 4
    assert parent.data.metrics["best_val_accuracy"] == found.best_value
    assert sorted(int(c.data.tags["optuna_trial"]) for c in children) == [0, 1, 2, 3]
    client = mlflow.MlflowClient()
    for child in children:
        number = int(child.data.tags["optuna_trial"])
        assert child.data.tags["trial_state"] == found.trials[number].state.name.lower()
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert [m.value for m in history] == [v for _, v in sorted(found.trials[number].intermediate_values.items())]
        assert not client.get_metric_history(child.info.run_id, "test_accuracy")

    # What the study tried, best first, as the report prints it.
    from tools.search_report import table

    report = table(found)
    assert report[0].startswith("Study `tiny-study`: space conf/search/default.yaml, at most "
                                "3,000 parameters, 2 epochs, scored on the last 256 training images")
    assert "on cpu" in report[0]
    rows = [line for line in report if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4 and rows[0].startswith(f"| {found.best_trial.number} | complete |")

    # The winner: a preset that composes (as `dvc exp run -S preset=tinybest` composes it)
    # to the winning model, with the winner's recipe.
    best = found.best_trial
    preset = yaml.safe_load((project / "conf/preset/tinybest.yaml").read_text())
    assert preset["model"]["layers"] == best.user_attrs["params"]["model"]["layers"]
    params = parse_params(compose("tinybest", conf=project / "conf"))
    assert count_parameters(build_model(params.model)) == best.user_attrs["parameters"]
    assert params.train.epochs == best.user_attrs["params"]["train"]["epochs"]
    assert params.train.validation == 0  # a preset trains on every training image

    # The same command again (in this process, as `python -m tools.search` runs it): the
    # study is full, nothing trains.
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    search.main(search_cmd("--trials", "4", "--study", "tiny-study", "--preset", "tinybest")[3:])
    assert "trial 4" not in capsys.readouterr().out
    assert len(study(project, "tiny-study").trials) == 4
    # Other settings under the same name are refused, before any trial.
    with pytest.raises(SystemExit, match=re.escape(
            "tools.search: error: STUDY=tiny-study was started with other settings (budget: 3000, now 4000)")):
        search.main(search_cmd("--trials", "4", "--study", "tiny-study", "--budget", "4000",
                               "--preset", "tinybest")[3:])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="no chromium on PATH (.ci/run installs Debian's package)")
def test_mlflow_ui_shows_the_study(project, tiny_study):
    """`mlflow ui` shows the study: its parent run in the search experiment's runs table."""
    from tools.mlflow_ui import browser_page, mlflow_ui, runs_page

    assert tiny_study.returncode == 0, tiny_study.stdout + tiny_study.stderr
    parent, _ = search_runs(project, "tiny-study")
    with mlflow_ui(f"sqlite:///{project / 'mlflow.db'}", project / "mlruns") as url, \
            browser_page() as page:
        page.goto(runs_page(url, parent.info.experiment_id))
        page.get_by_text("tiny-study", exact=True).first.wait_for()


@pytest.mark.slow
@pytest.mark.interruption
def test_ctrl_c_marks_the_trial_failed_and_the_same_command_continues(project):
    # Sampler seed 3: trial 1 draws lr 0.06 at batch 64, which trains, 12 steps an epoch (so
    # the Ctrl-C lands in training, not after the trial's last epoch). Unseeded, a trial 1 at
    # lr 0.4 and batch 64 could diverge in its first epoch and end before any Ctrl-C.
    cmd = search_cmd("--trials", "2", "--epochs", "6", "--study", "stop", "--preset", "stopbest",
                     "--seed", "3")
    errors = project / "search.err"
    with errors.open("w") as stderr_file:
        # PYTHONFAULTHANDLER: a worker that hangs after the Ctrl-C prints where, on SIGABRT.
        process = subprocess.Popen(cmd, cwd=project, env=env(project, PYTHONUNBUFFERED="1",
                                                             PYTHONFAULTHANDLER="1"),
                                   stdout=subprocess.PIPE, stderr=stderr_file, text=True,
                                   start_new_session=True)
        # Ctrl-C as soon as trial 1 has finished its first epoch, read from the worker's own
        # output: the pruner can end a trial from its second epoch on, so polling the
        # storage on a busy machine could miss the moment.
        seen = []
        for line in process.stdout:
            seen.append(line)
            if line.startswith("tools.search: trial 1 epoch 1/"):
                os.killpg(process.pid, signal.SIGINT)
                break
        else:
            pytest.fail(f"trial 1 never finished an epoch:\n{''.join(seen)}{errors.read_text()}")
        try:
            process.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGABRT)
            process.communicate()
            pytest.fail(f"the worker did not stop within 120 s of the Ctrl-C:\n{errors.read_text()[-6000:]}")
    stderr = errors.read_text()
    assert process.returncode == 1
    assert stderr.strip().splitlines()[-1].startswith(
        "tools.search: stopped; trial 1 is marked failed, 1 of 2 trials are done and kept; "
        "the same command continues the study"), stderr
    first = study(project, "stop").trials
    assert [t.state.name for t in first[:2]] in (["COMPLETE", "FAIL"], ["PRUNED", "FAIL"])
    kept = first[0]

    rerun = subprocess.run(cmd, cwd=project, env=env(project), capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "trial 0:" not in rerun.stdout and "trial 1:" not in rerun.stdout  # never rerun
    after = study(project, "stop").trials
    assert [t.state.name for t in after][1] == "FAIL"
    assert sum(t.state.name in ("COMPLETE", "PRUNED") for t in after) == 2
    assert (after[0].params, after[0].value) == (kept.params, kept.value)
    parent, children = search_runs(project, "stop")
    assert parent.info.status == "FINISHED"
    by_trial = {}
    for child in children:
        by_trial.setdefault(int(child.data.tags["optuna_trial"]), []).append(child)
    assert all(len(runs) == 1 for runs in by_trial.values())  # no trial logged twice
    assert by_trial[1][0].info.status == "KILLED" and by_trial[1][0].data.tags["trial_state"] == "fail"
    assert (project / "conf/preset/stopbest.yaml").is_file()


@pytest.mark.slow
@pytest.mark.interruption
def test_a_ctrl_c_during_the_epochs_bookkeeping_waits_for_it(project, monkeypatch):
    # The Ctrl-C arrives as the worker starts writing epoch 1 to Optuna and MLflow: the writes
    # end whole (the epoch is in both), then the trial is marked failed and the worker stops.
    report_epoch = search.Worker.report_epoch

    def interrupted(self, trial, *args):
        os.kill(os.getpid(), signal.SIGINT)
        report_epoch(self, trial, *args)

    monkeypatch.setattr(search.Worker, "report_epoch", interrupted)
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit, match=re.escape(
            "tools.search: stopped; trial 0 is marked failed, 0 of 2 trials are done and kept")):
        search.main(search_cmd("--trials", "2", "--study", "held", "--preset", "heldbest",
                               "--seed", "3")[3:])
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's handler is back
    (trial,) = study(project, "held").trials
    assert trial.state.name == "FAIL" and list(trial.intermediate_values) == [1]
    _, (child,) = search_runs(project, "held")
    assert child.info.status == "KILLED" and "val_accuracy" in child.data.metrics


@pytest.mark.slow
@pytest.mark.fault
def test_two_workers_share_one_postgresql_study(project, tmp_path):
    pgserver = pytest.importorskip("pgserver")
    server = pgserver.get_server(tmp_path / "pg", cleanup_mode="stop")
    try:
        storage = server.get_uri()  # postgresql://...: the tool picks the psycopg 3 driver
        cmd = search_cmd("--trials", "8", "--epochs", "4", "--study", "shared", "--preset", "sharedbest")
        workers = [subprocess.Popen(cmd, cwd=project, env=env(project, SEARCH_STORAGE=storage),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for _ in range(2)]
        outputs = [worker.communicate(timeout=600) for worker in workers]
        for worker, (stdout, stderr) in zip(workers, outputs):
            assert worker.returncode == 0, stdout + stderr
        trials = optuna.load_study(study_name="shared",
                                   storage=storage.replace("postgresql://", "postgresql+psycopg://")).trials
    finally:
        server.cleanup()
    counted = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(counted) == 8  # exactly the trials asked for, all workers together
    # A trial that is not counted is one a worker asked for when the study was already full.
    assert all("surplus" in t.user_attrs for t in trials if t not in counted)
    ran = [trained_trials(stdout) for stdout, _ in outputs]
    assert ran[0] and ran[1], "both workers ran trials"
    assert not ran[0] & ran[1], "no trial ran in both workers"
    assert ran[0] | ran[1] == {t.number for t in counted}
    parent, children = search_runs(project, "shared")  # one parent for both workers
    numbers = [int(child.data.tags["optuna_trial"]) for child in children]
    assert sorted(numbers) == sorted({t.number for t in trials if "surplus" not in t.user_attrs})
