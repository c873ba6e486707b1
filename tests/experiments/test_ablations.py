"""``nestlearn experiment ablations``: units per (variant, seed), subsets assembled later, Δ
perplexity against the same seed's full HOPE with its spread over seeds."""

from __future__ import annotations

import json

import pytest

from nestlearn.cli.main import main
from nestlearn.experiments.ablations import PRESETS, VARIANTS, build_parser, run_cfg
from nestlearn.experiments.lm_runs import parameter_count
from nestlearn.experiments.model_source import apply_preset

TINY = ["--steps", "2", "--eval-points", "1", "--max-tokens", "64", "--no-progress",
        "--set", "eval.max_tokens=64", "--seeds", "2"]  # fmt: skip


def _run(out, *variants: str) -> dict:
    assert main(["experiment", "ablations", *TINY, "--out", str(out), "--variants", *variants]) == 0
    return json.loads((out / "result.json").read_text())


@pytest.mark.slow
def test_subsets_reuse_units_and_assemble_paired_deltas(tmp_path, capsys):
    out = tmp_path / "abl"
    # A variant alone: its units, no Δ until full HOPE exists.
    alone = _run(out, "no_dgd")
    assert alone["summary"]["no_dgd"]["delta_ppl"]["n"] == 0
    assert alone["summary"]["no_dgd"]["val_ppl"]["n"] == 2
    capsys.readouterr()
    result = _run(out, "full", "no_dgd")
    printed = capsys.readouterr().out
    assert "no_dgd seed 0: val ppl" in printed and "(stored)" in printed
    records = {(r["variant"], r["seed"]): r for r in result["results"]}
    assert set(records) == {(v, s) for v in ("full", "no_dgd") for s in (0, 1)}
    assert records["no_dgd", 0]["reused"] and records["no_dgd", 1]["reused"]
    assert not records["full", 0].get("reused")
    paired = [records["no_dgd", s]["val_ppl"] - records["full", s]["val_ppl"] for s in (0, 1)]
    delta = result["summary"]["no_dgd"]["delta_ppl"]
    assert delta["values"] == pytest.approx(paired, rel=0, abs=1e-12)
    assert delta["n"] == 2 and delta["std"] is not None
    assert result["summary"]["full"]["delta_ppl"]["values"] == [0.0, 0.0]
    # Another subset into the same folder finds full HOPE stored: its Δ is paired too.
    other = _run(out, "fixed_v")
    assert other["summary"]["fixed_v"]["delta_ppl"]["n"] == 2
    assert (out / "runs" / "fixed_v" / "seed1" / "checkpoints").is_dir()
    # The full command once more only assembles: every unit stored, nothing retrained.
    capsys.readouterr()
    final = _run(out, "full", "no_dgd", "fixed_v")
    assert all(r["reused"] for r in final["results"])
    assert "| no_dgd |" in (out / "results.md").read_text()
    assert (out / "ablations.png").stat().st_size > 0


def test_unknown_variant_is_a_one_line_error(tmp_path, capsys):
    argv = ["experiment", "ablations", *TINY, "--out", str(tmp_path), "--variants", "no_such"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "--variants no_such: unknown; choose from full" in err and len(err.splitlines()) == 1


def test_cpu_preset_runs_every_variant_over_three_seeds():
    assert PRESETS["cpu"]["n_seeds"] == 3
    assert "full" in VARIANTS and len(VARIANTS) >= 12
    assert {"sm_dgd", "sm_momentum", "fixed_k", "fixed_v", "fixed_eta", "read", "cms_objective",
            "cms_variant", "cms_step"} <= {k for o, _ in VARIANTS.values() for k in o}  # fmt: skip


def test_no_cms_keeps_full_hopes_parameter_count(tmp_path):
    args = apply_preset(build_parser().parse_args(["--preset", "cpu"]), PRESETS)
    args.preset_sets = list(args.preset_sets)
    full, single = (run_cfg(args, v, 0, tmp_path).model for v in ("full", "no_cms"))
    assert len(single.cms_chunk_sizes) == 1 and len(full.cms_chunk_sizes) == 2
    counts = [parameter_count(m) for m in (full, single)]
    assert abs(counts[1] / counts[0] - 1) < 0.01, counts  # one norm fewer, same MLP width
