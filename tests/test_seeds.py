"""Several seeds of one recipe, summarised per optimizer (imbsam.train.seeds and the table CLI)."""
from __future__ import annotations

import json
import math
import os
import statistics

import pytest

from imbsam.train import table
from imbsam.train.seeds import format_seed_table, group_by_recipe


def run_metrics(opt, seed, all_acc, few=50.0, **recipe):
    args = {"dataset": "fmnist-lt", "imb_factor": 100.0, "model": "resnet32", "epochs": 30, "batch_size": 64,
            "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-3, "rho": 0.05, "eta": 240.0, "tail_weight": 2.0,
            "amp": "none", "seed": seed, "out": f"runs/{opt}-{seed}", "backend": "cpp"}
    args.update(recipe)
    return {"opt": opt, "many": 90.0, "medium": 70.0, "few": few, "all": all_acc, "dataset": args["dataset"],
            "imb_factor": args["imb_factor"], "model": args["model"], "epochs": args["epochs"], "wall_s": 10.0,
            "device": "cpu", "args": args}


def test_groups_by_optimizer_with_mean_and_sd():
    named = [("a", run_metrics("sgd", 1, 87.0)), ("b", run_metrics("imbsam", 1, 88.0, few=60.0)),
             ("c", run_metrics("sgd", 2, 86.0)), ("d", run_metrics("sgd", 3, 87.5)),
             ("e", run_metrics("imbsam", 2, 87.0, few=64.0))]
    groups = group_by_recipe(named)
    assert [(g.label, g.seeds) for g in groups] == [("sgd", [1, 2, 3]), ("imbsam", [1, 2])]
    mean, sd = groups[0].stats("all")
    assert mean == pytest.approx(statistics.mean([87.0, 86.0, 87.5]))
    assert sd == pytest.approx(statistics.stdev([87.0, 86.0, 87.5]))
    assert groups[1].stats("few") == pytest.approx((62.0, statistics.stdev([60.0, 64.0])))
    text = format_seed_table(groups)
    assert "sgd                              3  90.0 ± 0.0  70.0 ± 0.0  50.0 ± 0.0  86.8 ± 0.8" in text
    assert "sgd 1, 2, 3; imbsam 1, 2" in text


def test_one_run_has_no_standard_deviation():
    (group,) = group_by_recipe([("a", run_metrics("sam", 5, 85.5))])
    mean, sd = group.stats("all")
    assert mean == 85.5 and math.isnan(sd)
    assert "± nan" not in format_seed_table([group])


def test_a_different_recipe_is_another_group_named_by_what_differs():
    groups = group_by_recipe([("a", run_metrics("sam", 1, 85.0, epochs=30)),
                              ("b", run_metrics("sam", 1, 86.0, epochs=200)),
                              ("c", run_metrics("sam", 2, 85.4, epochs=30))])
    assert [(g.label, g.seeds) for g in groups] == [("sam (epochs 30)", [1, 2]), ("sam (epochs 200)", [1])]


def test_sgd_seeds_are_not_split_by_settings_sgd_ignores():
    groups = group_by_recipe([("a", run_metrics("sgd", 1, 87.0, rho=0.05)),
                              ("b", run_metrics("sgd", 2, 87.0, rho=0.1))])
    assert [g.seeds for g in groups] == [[1, 2]]
    groups = group_by_recipe([("a", run_metrics("sam", 1, 87.0, rho=0.05)),
                              ("b", run_metrics("sam", 2, 87.0, rho=0.1))])
    assert [g.label for g in groups] == ["sam (rho 0.05)", "sam (rho 0.1)"]


def test_tail_passes_and_sharpness_schedules_are_recipes_of_their_own():
    """A scheduled or tail-pass ImbSAM run is not another seed of the paper's ImbSAM; runs
    recorded before the options existed count as the paper's passes on every step."""
    older = run_metrics("imbsam", 1, 88.0)
    groups = group_by_recipe([("a", older), ("b", run_metrics("imbsam", 2, 87.0, sharpness_schedule="every")),
                              ("c", run_metrics("imbsam", 1, 86.0, sharpness_schedule="periodic:8")),
                              ("d", run_metrics("imbsam", 1, 85.0, tail_passes="subset", model="resnet32-gn")),
                              ("e", run_metrics("sgd", 1, 87.0)),
                              ("f", run_metrics("sgd", 2, 87.0, tail_passes="full"))])
    assert [(g.label, g.seeds) for g in groups] == [
        ("imbsam (model resnet32, tail_passes full, sharpness_schedule every)", [1, 2]),
        ("imbsam (model resnet32, tail_passes full, sharpness_schedule periodic:8)", [1]),
        ("imbsam (model resnet32-gn, tail_passes subset, sharpness_schedule every)", [1]), ("sgd", [1, 2])]


def test_the_same_seed_twice_is_refused():
    with pytest.raises(ValueError, match="runs/x and runs/y are the same recipe with the same seed \\(7\\)"):
        group_by_recipe([("runs/x", run_metrics("imbsam", 7, 88.0)), ("runs/y", run_metrics("imbsam", 7, 88.0))])


def write_runs(tmp_path, specs):
    dirs = []
    for opt, seed, acc in specs:
        d = tmp_path / f"{opt}-seed{seed}"
        os.makedirs(d)
        with open(d / "metrics.json", "w") as f:
            json.dump(run_metrics(opt, seed, acc), f)
        dirs.append(str(d))
    return dirs


def test_table_cli_summarises_seeds_and_plots_them(tmp_path, capsys):
    runs = write_runs(tmp_path, [("sgd", 1, 87.0), ("sgd", 2, 86.0), ("imbsam", 1, 88.0)])
    png = str(tmp_path / "seeds.png")
    table.main([*runs, "--plot-seeds", png])
    printed = capsys.readouterr().out
    assert "sgd seed 1 (30 ep, 10 s)" in printed and "per optimizer over seeds" in printed
    assert "86.5 ± 0.7" in printed
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_table_cli_prints_no_seed_summary_for_one_seed_each(tmp_path, capsys):
    table.main(write_runs(tmp_path, [("sgd", 1, 87.0), ("sam", 1, 86.0)]))
    assert "over seeds" not in capsys.readouterr().out


def test_table_cli_refuses_a_run_given_twice(tmp_path):
    (run,) = write_runs(tmp_path, [("sgd", 1, 87.0)])
    with pytest.raises(SystemExit, match="same seed \\(1\\)"):
        table.main([run, run])
