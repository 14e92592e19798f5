# The way in. `make repro` and `make test` set everything up first; nothing else to install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
UI_PORT ?= 5000
# dvc runs stage commands (`python -m stages.train`) through the shell: put the venv first.
export PATH := $(CURDIR)/$(BIN):$(PATH)
# MLflow 3's server and UI also start a job runner (a Huey consumer, five processes) for
# its GenAI jobs; tracking never uses it, and on a small machine it competes with training.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION ?= false

ITERATIONS := I0 I1 I2 I3
READMES := readme000 readme001 readme002 readme003
# Random seeds per preset (0..REPEATS-1), and experiments run at once (on a 2-core CPU,
# parallel runs only share the cores).
REPEATS ?= 3
JOBS ?= 1
# RESUME=1 finishes each preset's latest group: only the repeats it is missing run.
REPEATS_ARGS = --repeats "$(REPEATS)" --jobs "$(JOBS)" $(if $(RESUME),--resume)

.PHONY: setup repro test test-fast ui ui-screenshot server postgres team-up team-down pull promote serve predict iterations readmes repeats compare search exps results results-check bench bench-experiment bench-overheads profile recipes same-recipe plots params remote clean-venv

setup: $(STAMP)  ## create .venv with the pinned dependencies (idempotent)

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	touch $(STAMP)

repro: setup  ## download, train, evaluate on params.yaml
	$(BIN)/dvc repro

# Test modules run TEST_JOBS at a time (pytest-xdist; a module's tests stay together, so its
# trained fixtures are made once). Most of the suite's time is end-to-end runs that wait on
# process start-up and I/O, so two workers help even on two cores.
TEST_JOBS ?= 2
test: setup  ## the whole test suite (CI runs this)
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile

test-fast: setup  ## skip the tests marked slow
	$(BIN)/python -m pytest -n $(TEST_JOBS) --dist loadfile -m "not slow"

ui: setup  ## MLflow UI on this repo's store, local only
	@$(BIN)/python -c "from mnistlab.tracking import ui_url; print('MLflow UI:', ui_url($(UI_PORT)))"
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
		--default-artifact-root $(CURDIR)/mlruns --host 127.0.0.1 --port $(UI_PORT) --workers 1

ui-screenshot: setup  ## reports/ui/mlflow_compare.png: the two newest runs' accuracy per epoch (OUT=docs/mlflow_compare.png for the README's)
	$(BIN)/python -m tools.mlflow_ui $(if $(OUT),--out "$(OUT)")

# A tracking server for a team (or a laptop and a GPU box): runs, metrics and artifacts
# (models, reports) all land here. Clients: MLFLOW_TRACKING_URI=http://HOST:SERVER_PORT.
# BACKEND=postgresql+psycopg://user:pass@host/db for PostgreSQL (`make postgres` starts one).
SERVER_HOST ?= 127.0.0.1
SERVER_PORT ?= 5050
SERVER_DIR ?= $(CURDIR)/server
BACKEND ?= sqlite:///$(SERVER_DIR)/mlflow.db
# Other machines: SERVER_HOST=0.0.0.0 and ALLOWED_HOSTS, the names clients reach it by
# (mlflow.team.example:5050,...; MLflow refuses any other name with 403 "Invalid Host header"),
# CORS_ORIGINS for web pages of other origins. AUTH=1: users and passwords (MLflow's
# basic-auth app; the admin's password in MLFLOW_AUTH_ADMIN_PASSWORD, its users' database in
# SERVER_DIR; more users: .venv/bin/python -m tools.server add-user NAME).
ALLOWED_HOSTS ?=
CORS_ORIGINS ?=
AUTH ?=
SERVER_ARGS = --host "$(SERVER_HOST)" --port "$(SERVER_PORT)" --allowed-hosts "$(ALLOWED_HOSTS)" \
	--cors-origins "$(CORS_ORIGINS)" --auth "$(AUTH)" --server-dir "$(SERVER_DIR)" --workers 1
# tools/server.py checks BACKEND, the address and the database (seconds, one line each), then
# runs `mlflow server --serve-artifacts` with these settings. Not echoed: BACKEND may hold a
# password (the tool prints it hidden).
server: setup  ## MLflow tracking server with proxied artifacts, on SERVER_HOST:SERVER_PORT
	@$(BIN)/python -m tools.server --backend "$(BACKEND)" \
		--artifacts "$(SERVER_DIR)/artifacts" $(SERVER_ARGS)

postgres: setup  ## a private PostgreSQL (PyPI pgserver, no root) in SERVER_DIR/postgres; prints BACKEND
	$(BIN)/python -m tools.postgres "$(SERVER_DIR)/postgres"

# Both in the background, from one terminal: logs and PIDs in SERVER_DIR; the same settings as
# `make server` (a BACKEND given here is used instead of the private PostgreSQL).
team-up: setup  ## PostgreSQL and the tracking server in the background; prints MLFLOW_TRACKING_URI
	@$(BIN)/python -m tools.team up $(if $(filter command line,$(origin BACKEND)),--backend "$(BACKEND)") \
		$(SERVER_ARGS)

team-down: setup  ## stop what `make team-up` started
	@$(BIN)/python -m tools.team down --server-dir "$(SERVER_DIR)"

# The model users get: registered as mnist-cnn, the alias `champion` on the best one.
SERVE_PORT ?= 5001
MODEL ?= models:/mnist-cnn@champion
promote: setup  ## register the model of models/model.pt (RUN=<run id> for another); champion if better
	$(BIN)/python -m tools.promote $(if $(RUN),--run "$(RUN)")

serve: setup  ## serve MODEL (the champion) on 127.0.0.1:SERVE_PORT: POST /invocations
	$(BIN)/python -m tools.serve --model "$(MODEL)" --host 127.0.0.1 --port $(SERVE_PORT)

# tools.predict reads IMAGES from the environment (make passes it on), split as a shell splits
# words, so a quoted path may hold spaces: IMAGES='"my digits/a.png" b.png'.
predict: setup  ## classify digit images: make predict IMAGES="a.png b.jpg" [URL=http://...]
	$(BIN)/python -m tools.predict $(if $(URL),--url "$(URL)")

# Each preset REPEATS times, random seeds 0..REPEATS-1, as DVC experiments <preset>-s<seed>
# and one MLflow parent run per preset (tools/repeats.py). -f replaces an experiment of the
# same name and reruns it even when the run cache could skip it, so rerunning is safe.
iterations: setup  ## README 004's changelog, I0 to I3, REPEATS random seeds each
	$(BIN)/python -m tools.repeats $(REPEATS_ARGS) $(ITERATIONS)

readmes: setup  ## the presets of READMEs 000 to 003, REPEATS random seeds each
	$(BIN)/python -m tools.repeats $(REPEATS_ARGS) $(READMES)


repeats: setup  ## any presets, REPEATS random seeds each: make repeats PRESETS="search8000 I3"
	@test -n "$(PRESETS)" || { echo 'make repeats: give PRESETS="NAME ..." (names from conf/preset/)'; exit 2; }
	$(BIN)/python -m tools.repeats $(REPEATS_ARGS) $(PRESETS)

# Candidates scored on the validation split, each for the same random seeds, and the table of
# their runs (tools/compare_on_validation.py): how I3's layout was chosen. REPORT=1 runs nothing.
COMPARISON ?= I3_layout
compare: setup  ## candidates of conf/comparisons/COMPARISON on the validation split, JOBS at a time (REPORT=1: table only)
	$(BIN)/python -m tools.compare_on_validation "$(COMPARISON)" --jobs "$(JOBS)" $(if $(REPORT),--report --readme)

# The most accurate model within BUDGET parameters: an Optuna study of TRIALS trials of
# EPOCHS epochs, scored on the last VALIDATION training images, its best trial written to
# conf/preset/ (tools/search.py). The study is in search.db, or SEARCH_STORAGE (PostgreSQL):
# the same command on other machines, with the same SEARCH_STORAGE and MLFLOW_TRACKING_URI,
# adds workers to it. EXACT=1: every model has exactly BUDGET parameters.
BUDGET ?= 8000
EPOCHS ?= 15
TRIALS ?= 40
SPACE ?= default
VALIDATION ?= 10000
SEARCH_ARGS = --budget "$(BUDGET)" --epochs "$(EPOCHS)" --trials "$(TRIALS)" --space "$(SPACE)" \
	--validation "$(VALIDATION)" $(if $(STUDY),--study "$(STUDY)") $(if $(PRESET),--preset "$(PRESET)") \
	$(if $(EXACT),--exact) $(foreach item,$(SET),--set "$(item)")
search: setup  ## search BUDGET parameters, EPOCHS epochs, TRIALS trials (SPACE, STUDY, PRESET, EXACT=1)
	$(BIN)/python -m tools.search $(SEARCH_ARGS)

# `dvc exp show` lists every param and every dependency's hash (30 columns, lines of ~2,000
# characters); `make exps` shows one row per experiment of the current commit: preset, random
# seed, the params set on top of the preset, test accuracy, parameters, training seconds.
# FULL=1 is the whole `dvc exp show` (EXPS_ARGS passed to it, e.g. EXPS_ARGS=-A: all commits).
exps: setup  ## the experiments of this commit, one short row each (FULL=1: dvc exp show)
	$(if $(FULL),$(BIN)/dvc exp show $(EXPS_ARGS),$(BIN)/python -m tools.exps)

results: setup  ## rewrite the README's results table and figure from `dvc exp show`
	$(BIN)/python -m tools.results_table --repeats "$(REPEATS)" --readme

# Re-derive recorded rows of reports/results.json from the MLflow runs they name, in the store
# this clone points at (MLFLOW_TRACKING_URI, else mlflow.db): a non-zero exit when any differs.
results-check: setup  ## re-derive recorded results rows from their MLflow runs: make results-check PRESETS="I1 I3"
	@test -n "$(PRESETS)" || { echo 'make results-check: give PRESETS="NAME ..." (presets recorded in reports/results.json)'; exit 2; }
	$(BIN)/python -m tools.results_table --check $(PRESETS)

bench: setup  ## training throughput: the sources' way vs this pipeline, and the hardware floor
	$(BIN)/python -m benchmarks.train_throughput $(BENCH_ARGS)

# Whole recipes, timed as the train stage runs them. All eight take minutes on a GPU and
# hours on a small CPU: RECIPE_ARGS="--device cuda --presets I3 I1 I0 I2 readme000 readme001 readme002 readme003 --readme"
RECIPE_ARGS ?= --presets I3
recipes: setup  ## full recipes: training-loop time, accuracy, time to 99.4% (RECIPE_ARGS)
	$(BIN)/python -m benchmarks.recipe_time $(RECIPE_ARGS)

profile: setup  ## where a training step's time goes (torch.profiler, by kind of work)
	$(BIN)/python -m benchmarks.profile_step --readme

# A whole `dvc exp run` of PRESET, split into where its time goes (each stage's imports, data,
# training loop, reports, MLflow, DVC itself): EXPERIMENT_ARGS="--preset I3 --set train.device=cuda";
# before and after a change, medians of alternating runs: EXPERIMENT_ARGS="... --baseline REV --repeats 3"
EXPERIMENT_ARGS ?= --preset I1
bench-experiment: setup  ## a whole experiment's wall time and its split; --baseline REV (repeatable): before/after (EXPERIMENT_ARGS)
	$(BIN)/python -m benchmarks.experiment_time $(EXPERIMENT_ARGS)

bench-overheads: setup  ## per-epoch bookkeeping (MLflow, checkpoint) and no-op `dvc repro` times
	$(BIN)/python -m benchmarks.overheads --readme

same-recipe: setup  ## accuracy of the sources' way vs this pipeline on the same recipe and random seeds
	$(BIN)/python -m benchmarks.same_recipe --readme

plots: setup  ## DVC plots as HTML that renders offline (vega inlined from the npm registry)
	$(BIN)/python -m tools.offline_plots
	dvc plots show

# The DVC remote that `dvc push` and `dvc pull` use (a folder, s3://..., ...), as the default.
# verify: DVC hashes every object it pulls and refuses one that does not match (without it, a
# damaged object is checked out as it is). An existing remote of that name keeps its other
# settings (credentials, endpoint); the same command twice changes nothing. LOCAL=1: for this
# clone only (.dvc/config.local). NAME only from the command line: WSL exports NAME itself.
REMOTE_NAME = $(if $(filter command line,$(origin NAME)),$(NAME),storage)
REMOTE_LEVEL = $(if $(LOCAL), --local)
remote: setup  ## set the default DVC remote, pulls verified: make remote URL=... [NAME=storage] [LOCAL=1]
	@test -n "$(URL)" || { echo 'make remote: give URL=... (a folder, or s3://bucket/path with dvc-s3)'; exit 2; }
	@if $(BIN)/dvc remote list | cut -d' ' -f1 | grep -qxF "$(REMOTE_NAME)"; then \
		echo "dvc remote modify$(REMOTE_LEVEL) $(REMOTE_NAME) url $(URL)"; \
		$(BIN)/dvc remote modify$(REMOTE_LEVEL) "$(REMOTE_NAME)" url "$(URL)"; \
	else \
		echo "dvc remote add$(REMOTE_LEVEL) $(REMOTE_NAME) $(URL)"; \
		$(BIN)/dvc remote add$(REMOTE_LEVEL) "$(REMOTE_NAME)" "$(URL)"; \
	fi
	$(BIN)/dvc remote default$(REMOTE_LEVEL) "$(REMOTE_NAME)"
	$(BIN)/dvc remote modify$(REMOTE_LEVEL) "$(REMOTE_NAME)" verify true

# A new clone: plain `dvc pull` fails on the outputs dvc.lock names that no remote holds.
pull: setup  ## dvc pull what the remote has; says what came and what `dvc repro` will rebuild
	@$(BIN)/python -m tools.pull

params: setup  ## regenerate params.yaml from conf/ (dvc exp run does this itself)
	$(BIN)/python -c "from pathlib import Path; from dvc.utils.hydra import compose_and_dump; \
	compose_and_dump(Path('params.yaml'), str(Path('conf').resolve()), None, 'config', '.', [])"

clean-venv:
	rm -rf $(VENV)
