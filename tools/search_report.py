"""What a study of `make search` tried and found, as a table, from its Optuna storage.

    python -m tools.search_report --study search14500_I3-e15 [--readme]

One row per trial, best first: its state, layout (convs per block), conv channels, the
recipe settings it drew, parameters, the epochs it trained before it finished or was
pruned, its last validation accuracy, and the device it ran on. `--readme` writes the table
into docs/search.md's block `search-<study>`. The storage is SEARCH_STORAGE or search.db, as
for `make search`.
"""

from __future__ import annotations

import argparse

from mnistlab.config import ConvLayer, TransitionLayer, parse_params
from tools import doc_blocks
from tools.search import open_storage, storage_url, study_summary
from tools.search_space import LAYOUT_DIMENSIONS, OPTIONAL_LAYOUT_DIMENSIONS


def describe_layout(trial) -> tuple[str, str]:
    """(convs per block, conv channels) of a trial that was built; ("-", "-") otherwise."""
    if "params" not in trial.user_attrs:
        return "-", "-"
    model = parse_params(trial.user_attrs["params"]).model
    blocks, convs = [0], []
    for layer in model.layers:  # a block's convs end at its transition
        if isinstance(layer, ConvLayer):
            blocks[-1] += 1
            convs.append(layer.conv)
        elif isinstance(layer, TransitionLayer):
            blocks.append(0)
    shape = " + ".join(map(str, [b for b in blocks if b]))  # a tail's convs count as a block
    return shape + (" unpadded" if model.padding == "valid" else ""), ", ".join(map(str, convs))


def describe_recipe(trial) -> str:
    """The recipe settings the trial drew (the layout's are in the other columns)."""
    drawn = {key: value for key, value in trial.params.items()
             if key not in (*LAYOUT_DIMENSIONS, *OPTIONAL_LAYOUT_DIMENSIONS)
             and not key.startswith("convs_")}

    def shown(value) -> str:
        if isinstance(value, bool):
            return str(value).lower()  # as YAML writes it
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    return ", ".join(f"{key} {shown(value)}" for key, value in drawn.items()) or "-"


def table(study) -> list[str]:
    settings = study.user_attrs["settings"]
    summary = study_summary(study)
    trials = sorted(study.trials, key=lambda t: (t.state.name != "COMPLETE",
                                                 -(t.value or 0), -len(t.intermediate_values)))
    trained = [t for t in study.trials if t.intermediate_values]
    # Trials recorded before `describe` said "1 thread" carry "(1 threads)".
    devices = sorted({t.user_attrs["device"].replace("(1 threads)", "(1 thread)")
                      for t in trained if "device" in t.user_attrs})
    unrecorded = [str(t.number) for t in trained if "device" not in t.user_attrs]
    if unrecorded:  # trials of a study begun before trials recorded their device
        devices.append(f"device not recorded for trial{'s' * (len(unrecorded) > 1)} "
                       f"{', '.join(unrecorded)}")
    lines = [
        f"Study `{study.study_name}`: space conf/search/{settings['space']}.yaml, "
        f"{'exactly' if settings['exact'] else 'at most'} {settings['budget']:,} parameters, "
        f"{settings['epochs']} epochs, scored on the last {settings['validation']:,} training "
        f"images; {summary['n_complete']} complete, {summary['n_pruned']} pruned, "
        f"{summary['n_failed']} failed; on {', '.join(devices) or 'no device yet'} "
        f"(`python -m tools.search_report --study {study.study_name}`).",
        "",
        "| trial | state | convs per block | conv channels | recipe drawn | parameters | epochs | last val acc |",
        "| ---: | --- | --- | --- | --- | ---: | ---: | ---: |",
    ]
    for trial in trials:
        convs, channels = describe_layout(trial)
        scores = trial.intermediate_values
        last = f"{scores[max(scores)]:.2%}" if scores else "-"
        count = trial.user_attrs.get("parameters")
        state = "surplus" if "surplus" in trial.user_attrs else trial.state.name.lower()
        lines.append(f"| {trial.number} | {state} | {convs} | {channels} | {describe_recipe(trial)} | "
                     f"{f'{count:,}' if count else '-'} | {len(scores)} | {last} |")
    return lines


def main() -> None:
    import optuna

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", required=True)
    parser.add_argument("--readme", action="store_true", help="write the table into docs/search.md")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=args.study, storage=open_storage(storage_url()))
    except KeyError:
        raise SystemExit(f"tools.search_report: error: no study {args.study!r} in "
                         f"{storage_url()}") from None
    lines = table(study)
    print("\n".join(lines))
    if args.readme:
        doc_blocks.update({f"search-{args.study}": lines})


if __name__ == "__main__":
    main()
