"""gqa-reproduce: the smoke preset end to end (CI), resumability, presets and bad input."""
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from gqa_flax import errors
from gqa_flax.checkpoints.convert import kv_head_similarity
from gqa_flax.checkpoints.reader import open_checkpoint
from gqa_flax.reproduce import (baselines, claims, cli, evaluate, figures, report, runner,
                                statistics, timing)
from gqa_flax.reproduce.presets import Variant, load_preset
from gqa_flax.reproduce.stages import Plan
from tests.test_convert import T5X_TINY


def _reproduce(*args, env=None):
  return subprocess.run([sys.executable, "-m", "gqa_flax.reproduce.cli", *args],
                        capture_output=True, text=True, env=env, check=False)


@pytest.fixture(scope="module")
def smoke_run(mini_data_dir, tmp_path_factory):
  """Runs the smoke preset once (the prepare stage reuses the session's mini corpus, which
  has the smoke preset's options), with a temporary directory of its own."""
  out, tmp = tmp_path_factory.mktemp("smoke"), tmp_path_factory.mktemp("smoke_tmpdir")
  result = _reproduce("--preset", "smoke", "--out", str(out), "--data_dir", str(mini_data_dir),
                      "--heartbeat", "60", env=dict(os.environ, TMPDIR=str(tmp)))
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return out, result, tmp


@pytest.mark.slow
def test_smoke_table_and_figures(smoke_run):
  out, _, tmp = smoke_run
  assert not [p.name for p in tmp.iterdir() if p.name.startswith("gqa_reproduce_")]  # none left
  with open(out / "table1.json") as f:
    table = json.load(f)
  preset = load_preset("smoke")
  assert table["preset"] == "smoke" and table["hardware"]
  assert [(r["attention"], r["alpha"]) for r in table["rows"]] == [
      (v.attention, v.alpha) for v in preset.variants]
  for r in table["rows"]:
    assert set(r["scores"]) == set(preset.tasks)
    for value in [r["t_infer_s"], r["average"], *r["scores"].values()]:
      assert isinstance(value, float) and math.isfinite(value), r
    assert r["t_infer_s"] > 0
    assert all(n > 0 for n in r["n_eval_examples"].values())
  # kv heads come from the evaluated checkpoints' configs: MHA 4, MQA 1, GQA-2 2.
  assert [r["kv_heads"] for r in table["rows"]] == [4, 1, 2]
  assert [p["kv_heads"] for p in table["fig6"]["points"]] == [1, 2, 4]
  assert [p["kv_heads"] for p in table["fig6_kv_bound"]["points"]] == [1, 2, 4]
  assert "MHA-XXL" in table["paper"]["rows"]
  for r in table["rows"]:  # two seeds, each fine-tuned and scored
    assert r["seeds"] == [0, 1] and len(r["average_by_seed"]) == 2
    assert r["heldout_ci95"][0] <= r["heldout_loss"] <= r["heldout_ci95"][1]
  markdown = (out / "table1.md").read_text()
  assert "| MQA-tiny | 0.05 | mean |" in markdown and "paper" in markdown
  for name in ("fig3", "fig4", "fig5", "fig6", "pretraining"):
    png = out / f"{name}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # The pre-training curve: training loss every 10 steps (and at step 1, where Orbax saves
  # a run's first checkpoint), held-out loss at the end (step 40).
  curve = table["pretraining"]["tiny"]
  assert curve["step"] == [10, 20, 30, 40] and curve["heldout_step"] == [40]
  assert len(curve["kv_head_similarity"]) == 8  # 2 decoder layers x 2 attentions x key, value
  assert all(-1 <= x <= 1 for x in curve["kv_head_similarity"].values())


CLAIM_KEYS = {"id", "statement", "measure", "estimate", "ci95", "paper_direction", "threshold",
              "verdict"}


@pytest.mark.slow
def test_smoke_claims_follow_from_their_intervals(smoke_run):
  """claims.json has the schema, each verdict follows from its interval by the rule, and a
  claim whose variants the smoke preset lacks is 'not run' naming them."""
  out, _, _ = smoke_run
  written = json.loads((out / "claims.json").read_text())
  assert written["preset"] == "smoke"
  by_id = {claim["id"]: claim for claim in written["claims"]}
  assert set(by_id) == {"C1", "C1s", "C2", "C2b", "C3a", "C3b", "C4", "C5", "C6"}
  for claim in written["claims"]:
    assert CLAIM_KEYS <= set(claim) and claim["paper_direction"] in ("<", ">"), claim
    if claim["verdict"] == "not run":
      assert claim["ci95"] is None and claim["missing"], claim
      continue
    low, high = claim["ci95"]
    assert low <= claim["estimate"] <= high or not math.isfinite(low), claim
    assert claim["verdict"] == statistics.verdict(
        statistics.Interval(claim["estimate"], low, high), claim["paper_direction"],
        claim["threshold"])
  # Run: MHA, MQA at alpha 0 and 0.05, GQA-2 at alpha 0, Figure 6 at G 1, 2, 4.
  assert {c for c, claim in by_id.items() if claim["verdict"] != "not run"} == {
      "C1s", "C2", "C4", "C5"}
  assert by_id["C5"]["measure"] == "(T_2 - T_1) / (T_4 - T_1)"  # on the kv-bound stage's times
  assert by_id["C1"]["missing"] == ["heldout/tiny-gqa2-a0.05-mean"]
  heldout = json.loads((out / "stages" / "heldout" / "result.json").read_text())
  assert heldout["num_examples"] == 16 and all(
      len(losses) == 16 and all(math.isfinite(x) and x > 0 for x in losses)
      for losses in heldout["losses"].values())
  # Two seeds: the pre-trained MHA and the deterministic conversion are the same model for
  # both; MQA's uptraining saw another data order per seed.
  losses = heldout["losses"]
  assert losses["heldout/tiny-mha/s0"] == losses["heldout/tiny-mha/s1"]
  assert losses["heldout/tiny-mqa-a0-mean/s0"] == losses["heldout/tiny-mqa-a0-mean/s1"]
  assert losses["heldout/tiny-mqa-a0.05-mean/s0"] != losses["heldout/tiny-mqa-a0.05-mean/s1"]
  assert "| C2 |" in (out / "claims.md").read_text()


@pytest.mark.slow
def test_smoke_rerun_skips_done_stages_and_reruns_missing(smoke_run):
  out, _, _ = smoke_run
  done = out / "stages" / "fig6-timing" / "DONE.json"
  kept = out / "stages" / "evaluate" / "DONE.json"
  kept_mtime = kept.stat().st_mtime
  done.unlink()
  result = _reproduce("--preset", "smoke", "--out", str(out), "--data_dir",
                      str(out.parent / "unused"))
  assert result.returncode == 0, result.stderr[-2000:]
  num_stages = len(list((out / "stages").iterdir()))
  assert f"{num_stages - 1} done, 1 to run" in result.stdout
  assert "running fig6-timing" in result.stdout and "running evaluate" not in result.stdout
  assert done.is_file() and kept.stat().st_mtime == kept_mtime


def test_plan_runs_the_project_entry_points(tmp_path):
  preset = load_preset("mini")
  plan = Plan(preset, str(tmp_path), str(tmp_path / "data"))
  stages = {s.name: s for s in plan.stages()}
  # One uptraining run per conversion and seed, to its largest alpha, saving at every alpha:
  # MQA by mean at alpha 0.025, 0.05, 0.1 and 0.2 of 1500 pre-training steps.
  uptrain = stages["uptrain-mini-mqa-mean-s0"].argv
  assert uptrain[1:3] == ["-m", "gqa_flax.train"]
  assert "--gin_file=reproduce/mini/uptrain.gin" in uptrain
  assert "--gin.TRAIN_STEPS=1800" in uptrain
  assert "--gin.SaveCheckpointConfig.steps=[1538, 1575, 1650, 1800]" in uptrain
  assert f'--gin.MODEL_DIR="{tmp_path}/runs/uptrain-mini-mqa-mean-s0"' in uptrain
  assert "--gin.TRAIN_STEPS=1575" in stages["uptrain-mini-gqa4-first-s0"].argv
  names = list(stages)
  # 11 conversions: aligned MQA and GQA-4 and grouped GQA-4 are scored at alpha 0 only.
  assert len([n for n in names if n.startswith("uptrain-")]) == 11 * 3
  assert stages["convert-mini-mqa-random-s0"].argv[1:3] == ["-m", "gqa_flax.convert"]
  assert "--method=random" in stages["convert-mini-mqa-random-s0"].argv
  # Fine-tuning: Table 1's variants only (MHA from the pre-trained checkpoint), per seed.
  finetune = stages["finetune-mini-gqa2-a0.05-mean-s0-gqa_mini_title"].argv
  assert (f'--gin.INITIAL_CHECKPOINT_PATH="{tmp_path}/runs/uptrain-mini-gqa2-mean-s0/'
          'checkpoint_1575"') in finetune
  assert "--gin.TRAIN_STEPS=1675" in finetune
  assert (f'--gin.INITIAL_CHECKPOINT_PATH="{tmp_path}/runs/pretrain-mini/checkpoint_1500"'
          in stages["finetune-mini-mha-s1-gqa_mini_ende"].argv)
  assert len([n for n in names if n.startswith("finetune-")]) == 3 * 3 * 2
  assert {"pretrain-mini", "pretrain-micro"} <= set(names)
  assert len(preset.variants) == 22 and len(preset.table_variants) == 3
  # The held-out losses: every conversion right after it (alpha 0) and every uptrained run.
  heldout = stages["heldout"].argv
  assert heldout[1:3] == ["-m", "gqa_flax.reproduce.heldout"]
  assert (f"--score=heldout/mini-mqa-a0-mean/s0={tmp_path}/runs/convert-mini-mqa-mean/"
          "checkpoint_1500") in heldout
  assert (f"--score=heldout/mini-mqa-a0.025-mean/s2={tmp_path}/runs/uptrain-mini-mqa-mean-s2/"
          "checkpoint_1538") in heldout
  assert f"--score=heldout/micro-mha/s0={tmp_path}/runs/pretrain-micro/checkpoint_1500" in heldout
  assert names.index("heldout") > max(i for i, n in enumerate(names) if n.startswith("uptrain"))
  for stage in stages.values():
    for arg in stage.argv:
      if arg.startswith("--gin_file=") or (arg.startswith("--eval=")):
        gin_file = arg.split("=", 1)[1].split(":", 1)[-1].split("=")[0]
        assert os.path.isfile(os.path.join("configs", gin_file)), arg


def test_every_run_after_pretraining_takes_each_seed(tmp_path):
  """Seeds 3 and 7: pre-training and deterministic conversions once; the random conversion,
  uptraining and fine-tuning once per seed, with the seed; held-out names per seed, the
  deterministic checkpoints shared."""
  plan = Plan(load_preset("mini", ["Preset.seeds = [3, 7]"]), str(tmp_path), None)
  stages = {s.name: s for s in plan.stages()}
  names = list(stages)
  assert len([n for n in names if n.startswith("pretrain-")]) == 2
  assert "convert-mini-mqa-mean" in stages and not any(
      n.startswith("convert-mini-mqa-mean-s") for n in names)
  assert "--seed=3" not in stages["convert-mini-mqa-mean"].argv
  for seed in (3, 7):
    assert f"--seed={seed}" in stages[f"convert-mini-mqa-random-s{seed}"].argv
    uptrain = stages[f"uptrain-mini-mqa-random-s{seed}"].argv
    assert f"--gin.RANDOM_SEED={seed}" in uptrain
    assert (f'--gin.INITIAL_CHECKPOINT_PATH="{tmp_path}/runs/convert-mini-mqa-random-s{seed}/'
            'checkpoint_1500"') in uptrain
    finetune = stages[f"finetune-mini-mha-s{seed}-gqa_mini_ende"].argv
    assert f"--gin.RANDOM_SEED={seed}" in finetune
    assert f'--gin.MODEL_DIR="{tmp_path}/runs/finetune-mini-mha-s{seed}-gqa_mini_ende"' in finetune
  assert not any("RANDOM_SEED" in a for a in stages["pretrain-mini"].argv)
  assert len([n for n in names if n.startswith("finetune-")]) == 2 * 3 * 2
  evals = [a for a in stages["evaluate"].argv if a.startswith("--eval=mini-mqa-a0.05-mean-s")]
  assert [a.split(":")[0] for a in evals] == ["--eval=mini-mqa-a0.05-mean-s3"] * 2 + [
      "--eval=mini-mqa-a0.05-mean-s7"] * 2
  checkpoints = plan.heldout_checkpoints()
  assert checkpoints["heldout/mini-mha/s3"] == checkpoints["heldout/mini-mha/s7"]
  assert checkpoints["heldout/mini-mqa-a0-mean/s3"] == checkpoints["heldout/mini-mqa-a0-mean/s7"]
  assert checkpoints["heldout/mini-mqa-a0-random/s3"] != checkpoints[
      "heldout/mini-mqa-a0-random/s7"]
  # MHA of mini and micro; 14 conversions (G = 1, 2, 4 x mean, first, random, aligned; G = 2, 4
  # grouped) at alpha 0, 11 of them also at 0.05 (not aligned MQA, GQA-4, grouped GQA-4); MQA
  # and GQA-2 by mean at 0.025, 0.1 and 0.2.
  assert len(checkpoints) == 2 * len(plan.heldout_variants()) == 2 * (2 + 14 + 11 + 6)
  assert "uptrain-mini-gqa4-aligned-s3" not in stages
  assert checkpoints["heldout/mini-gqa4-a0-aligned/s3"] == f"{tmp_path}/runs/" \
      "convert-mini-gqa4-aligned/checkpoint_1500"
  # Aligned conversions calibrate on the pre-training task's train examples; the others do not.
  aligned = stages["convert-mini-gqa2-aligned"].argv
  assert "--method=aligned" in aligned
  assert "--calibration_task_gin=reproduce/mini/span_corruption.gin" in aligned
  assert "--calibration_examples=512" in aligned
  assert not any(a.startswith("--calibration") for a in stages["convert-mini-gqa2-mean"].argv)


def test_finetune_variants_must_be_variants_and_hold_the_table():
  with pytest.raises(errors.UserError, match="finetune_variants .*are not in variants"):
    load_preset("mini", ["Preset.finetune_variants = [('mini', 8, 0.05, 'mean')]"])
  with pytest.raises(errors.UserError, match="table_variants .*are not fine-tuned"):
    load_preset("mini", ["Preset.finetune_variants = [('mini', None, 0.0, 'mean')]"])


def _two_seed_records(plan: Plan) -> dict:
  """Stage results of the smoke preset with seeds 0 and 1, by hand: variant i, seed s scores
  10 i + s on its task, decodes in (i + 1 + s) ms; held-out losses 2 + i / 10 + example / 100
  + s / 10 (MHA's the same for both seeds: pre-trained once)."""
  variants, heldout = {}, {}
  for i, v in enumerate(plan.preset.variants):
    for seed in (0, 1):
      variants[f"{v.key}-s{seed}"] = {
          "tasks": {"gqa_mini_title": {"score": 10.0 * i + seed, "kv_heads": v.kv_heads or 4,
                                       "metric": "rouge1", "n_eval_examples": 8,
                                       "test_losses": [3.0 + i + seed + e / 8 for e in range(8)]}},
          "t_infer_s": (i + 1 + seed) / 1e3, "device": "cpu"}
  for i, v in enumerate(plan.heldout_variants()):
    for seed in (0, 1):
      shift = 0 if v.kv_heads is None else seed / 10
      heldout[f"heldout/{v.key}/s{seed}"] = [2 + i / 10 + e / 100 + shift for e in range(16)]
  points = [{"kv_heads": g, "attention": "x", "t_infer_s": 0.002, "t_infer_repeats_s":
             [0.001, 0.002, 0.004]} for g in (1, 2, 4)]
  return {"evaluate": {"result": {"variants": variants}, "seconds": 90.0,
                       "load_average": [2.5, 2.0, 1.5]},
          "heldout": {"result": {"losses": heldout}, "seconds": 30.0,
                      "load_average": [1.5, 1.0, 1.0]},
          "fig6-timing": {"result": {"points": points, "inputs": 64, "targets": 16,
                                     "batch_size": 4, "repeats": 3}, "seconds": 12.0}}


def test_table_rows_combine_the_seeds_and_carry_the_held_out_interval(tmp_path):
  plan = Plan(load_preset("smoke", ["Preset.seeds = [0, 1]"]), str(tmp_path), None)
  records = _two_seed_records(plan)
  # The pre-training run's metrics: training loss every 10 steps, held-out every 20.
  run = tmp_path / "runs" / "pretrain-tiny"
  run.mkdir(parents=True)
  run.joinpath("metrics.jsonl").write_text("\n".join(
      json.dumps({"step": step, report.TRAIN_LOSS: 10 - step / 10,
                  **({report.HELDOUT_LOSS: 8 - step / 20} if step % 20 == 0 else {})})
      for step in range(10, 90, 10)))
  # The held-out stage's similarity of the pre-trained model's heads (here the real T5X one's).
  similarity = kv_head_similarity(open_checkpoint(T5X_TINY))
  records["heldout"]["result"]["kv_head_similarity"] = {"tiny": similarity}
  # MQA's scored test examples, as the evaluate stage writes them (gqa-eval's predictions).
  abstracts = ["gene expression in the mouse liver after a high fat diet was measured here",
               "a randomized trial of aspirin for stroke prevention in older adults was run"]
  titles = ["gene expression in mouse liver", "aspirin for stroke prevention"]
  mqa_variant = plan.preset.variants[1]
  for seed, guesses in ((0, ["gene expression", "a trial"]), (1, ["mouse liver", "aspirin"])):
    out = evaluate.run_output_dir(plan.stage_dir("evaluate"), f"{mqa_variant.key}-s{seed}",
                                  plan.run_dir(plan.finetune_run(mqa_variant, seed,
                                                                 "gqa_mini_title")))
    os.makedirs(out)
    with open(os.path.join(out, "gqa_mini_title-predictions.jsonl"), "w") as f:
      for abstract, title, guess in zip(abstracts, titles, guesses):
        f.write(json.dumps({"inputs": abstract, "targets": title, "prediction": guess}) + "\n")
  table = report.build_table(plan, records, None)
  mqa = table["rows"][1]  # variant 1: MQA, alpha 0.05
  assert mqa["label"] == "MQA-tiny" and mqa["seeds"] == [0, 1]
  assert mqa["scores_by_seed"] == {"gqa_mini_title": [10.0, 11.0]}
  assert mqa["average"] == mqa["scores"]["gqa_mini_title"] == 10.5
  assert mqa["t_infer_s"] == pytest.approx(2.5e-3) and mqa["t_infer_by_seed_s"] == [2e-3, 3e-3]
  # Held-out: [seeds, examples] as the claims see it, with their bootstrap interval.
  sample = claims.measurements(records)["heldout/tiny-mqa-a0.05-mean"]
  assert sample.shape == (2, 16) and sample[1, 0] - sample[0, 0] == pytest.approx(0.1)
  interval = statistics.bootstrap(lambda loss: loss, [sample])
  assert mqa["heldout_loss"] == pytest.approx(sample.mean())
  assert mqa["heldout_ci95"] == [interval.low, interval.high]
  assert interval.low < sample.mean() < interval.high
  # The fine-tuned test loss: seeds 3.0 + 1 + (0, 1) + example / 8, with its interval.
  test = mqa["test_loss"]["gqa_mini_title"]
  assert test["loss"] == pytest.approx(4.5 + 3.5 / 8)
  assert test["ci95"][0] < test["loss"] < test["ci95"][1]
  # The margin over the lead baseline, from the seeds' predictions of the same examples.
  margin = mqa["baselines"]["gqa_mini_title"]
  model = np.mean([baselines.rouge1_per_example(titles, guesses) for guesses in (
      ["gene expression", "a trial"], ["mouse liver", "aspirin"])])
  lead = baselines.rouge1_per_example(titles, [baselines.lead_words(a) for a in abstracts])
  assert margin["model_score"] == pytest.approx(model)
  assert margin["margin"] == pytest.approx(model - lead.mean())
  assert table["rows"][0]["baselines"] == {}  # MHA: no predictions written here
  # Every held-out variant (alpha 0 of each conversion too) is in the table, for Figure 5.
  assert [e["key"] for e in table["heldout"]] == [v.key for v in plan.heldout_variants()]
  markdown = report.to_markdown(table)
  assert "| MQA-tiny | 0.05 | mean | 2.50 (2.00-3.00) |" in markdown
  assert "10.50 (10.00-11.00)" in markdown and "2 x 16" in markdown
  assert f"| MQA-tiny | 0.05 | mean | {test['loss']:.3f} [" in markdown
  assert (f"| MQA-tiny | gqa_mini_title (rouge1) | the abstract's first 12 words | "
          f"{lead.mean():.2f} | {model:.2f} | {model - lead.mean():+.2f} [") in markdown
  curve = table["pretraining"]["tiny"]
  assert curve["step"] == list(range(10, 90, 10)) and curve["heldout_step"] == [20, 40, 60, 80]
  assert curve["heldout_loss"] == [7.0, 6.0, 5.0, 4.0]
  # The last quarter of 80 steps starts at step 60: (5 - 4) / 5.
  assert report.last_quarter_drop(curve) == pytest.approx(0.2)
  assert "it fell 20.0% over the last quarter" in markdown
  assert curve["kv_head_similarity"] == pytest.approx(similarity)
  assert curve["mean_kv_head_similarity"] == pytest.approx(np.mean(list(similarity.values())))
  assert f"mean pairwise cosine similarity of {curve['mean_kv_head_similarity']:.3f}" in markdown
  assert table["stage_times"]["heldout"] == {"seconds": 30.0, "finished_at": None,
                                             "load_average": [1.5, 1.0, 1.0]}
  assert "| evaluate | 1 | 1.50 | 1.50 |" in markdown and "| fig6 | 1 | 0.20 | 0.20 |" in markdown
  assert "Load average (1 min) at the stages' ends: 1.50-2.50, median 2.00." in markdown
  assert report.check_finite(table) == []
  assert [os.path.basename(p) for p in figures.draw_all(table, str(tmp_path))] == [
      "fig3.png", "fig4.png", "fig5.png", "fig6.png", "pretraining.png"]


@pytest.mark.parametrize("seeds", ["[]", "[1, 1]", "[-1]"])
def test_bad_seeds_are_refused(seeds):
  with pytest.raises(ValueError, match="seeds must be distinct non-negative integers"):
    load_preset("smoke", [f"Preset.seeds = {seeds}"])


def test_calibration_without_a_task_is_refused():
  with pytest.raises(ValueError, match="calibration_examples calibrates on heldout_task_gin's"):
    load_preset("smoke", ["Preset.calibration_examples = 64", "Preset.heldout_task_gin = ''"])


def test_kv_bound_timing_times_each_group_of_a_model_shape_with_random_weights(tmp_path):
  """`timing --model_gin`: each G is the shape with G key/value heads (random weights); the
  result has each G's repeats and their median."""
  models = dict((config.num_kv_heads, params) for config, params in timing.random_models(
      timing.model_config("models/t5_1_1/tiny.gin", []), [1, 4]))
  for g, params in models.items():
    key = params["decoder"]["layers_0"]["self_attention"]["key"]["kernel"]
    query = params["decoder"]["layers_0"]["self_attention"]["query"]["kernel"]
    assert key.size * 4 == query.size * g  # tiny: 4 query heads
  output = tmp_path / "result.json"
  assert timing.main(["--model_gin=models/t5_1_1/tiny.gin", "--groups=1,4", "--inputs=16",
                      "--targets=4", "--batch_size=2", "--repeats=3", "--layout=1=1::3",
                      f"--output={output}"]) == 0
  result = json.loads(output.read_text())
  assert result["source"] == "models/t5_1_1/tiny.gin"
  assert [(p["kv_heads"], p["attention"]) for p in result["points"]] == [(1, "MQA"), (4, "MHA")]
  for point in result["points"]:
    assert len(point["t_infer_repeats_s"]) == 3 and min(point["t_infer_repeats_s"]) > 0
    assert point["t_infer_s"] == sorted(point["t_infer_repeats_s"])[1]
  # G=1 in its own layout (--layout: batch 3), G=4 in the default one.
  assert [p["layout"] for p in result["points"]] == [
      {"num_partitions": 1, "kv_batch_partitioned": False, "batch_size": 3},
      {"num_partitions": 1, "kv_batch_partitioned": False, "batch_size": 2}]


@pytest.mark.parametrize("layout", ["1=x", "1", "1=8:replicated", "one=8"])
def test_a_bad_timing_layout_is_one_line(layout, tmp_path, capsys):
  assert timing.main(["--model_gin=models/t5_1_1/tiny.gin", "--groups=1", "--inputs=8",
                      "--targets=2", f"--layout={layout}", f"--output={tmp_path / 'r.json'}"]) == 1
  assert capsys.readouterr().err.strip() == (
      f"gqa_flax.reproduce.timing: error: --layout {layout!r}: expected "
      "G=PARTITIONS[:split][:BATCH], e.g. 1=8:split:256")
  assert not (tmp_path / "r.json").exists()


def test_the_kv_bound_timing_stage_feeds_the_speed_claims(tmp_path):
  preset = load_preset("mini")
  plan = Plan(preset, str(tmp_path), None)
  stage = {s.name: s for s in plan.stages()}["fig6-timing-kv-bound"]
  assert "--model_gin=reproduce/mini/kv_bound_shape.gin" in stage.argv
  assert "--groups=1,2,4,8" in stage.argv
  by_id = {claim.id: claim for claim in claims.preset_claims(preset)}
  assert by_id["C5"].needs == ("time-kv-bound/g4", "time-kv-bound/g1", "time-kv-bound/g8")
  assert by_id["C1s"].needs == ("time-kv-bound/g2", "time-kv-bound/g1", "time-kv-bound/g8")
  records = {"fig6-timing-kv-bound": {"result": {"points": [
      {"kv_heads": 2, "t_infer_repeats_s": [1.0, 2.0]}]}}}
  np.testing.assert_array_equal(claims.measurements(records)["time-kv-bound/g2"], [[1.0, 2.0]])


def test_paper_preset_uses_public_checkpoints_and_paper_tasks():
  preset = load_preset("paper")
  assert preset.pretrain_steps == 1_000_000
  assert [v.label for v in preset.table_variants] == ["MHA-Large", "MHA-XXL", "MQA-XXL",
                                                      "GQA-8-XXL"]
  assert Variant("XXL", 8, 0.05, "mean").key == "xxl-gqa8-a0.05-mean"
  plan = Plan(preset, "/out", None)
  stages = {s.name: s for s in plan.stages()}
  names = list(stages)
  assert not any(n.startswith(("prepare", "pretrain")) for n in names)
  assert len([n for n in names if n.startswith("finetune-")]) == 11 * 7
  # Figure 6 decodes every G in gqa-plan's fastest layout on v4-16 (data 4 x model 2).
  timing_argv = stages["fig6-timing"].argv
  assert [f"--layout={g}=2::128" for g in (1, 2, 4, 8, 16, 32)] + ["--layout=64=2::64"] == [
      a for a in timing_argv if a.startswith("--layout=")]
  assert "--num_partitions=8" in timing_argv


@pytest.mark.parametrize("args, message", [
    (["--preset", "nope", "--out", "/tmp/x"], "unknown preset 'nope'"),
    (["--preset", "smoke", "--out", "/tmp/x", "--gin_bindings",
      "Preset.variants = [('huge', 1, 0.05, 'mean')]"], "unknown model 'huge'"),
    (["--preset", "smoke", "--out", "/tmp/x", "--gin_bindings",
      "Preset.variants = [('tiny', 1, 0.05, 'avg')]"], "method 'avg'"),
])
def test_bad_input_is_one_line_and_nonzero(args, message, capsys):
  assert cli.main(args) == 1
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1


def test_the_mini_preset_measures_what_every_claim_needs(tmp_path):
  """`make reproduce` decides C1-C6: its held-out stage (the smaller micro model included) and
  the key/value-bound Figure 6 give every measurement they need."""
  preset = load_preset("mini")
  plan = Plan(preset, str(tmp_path), str(tmp_path / "data"))
  assert "fig6-timing-kv-bound" in [stage.name for stage in plan.stages()]
  measured = {name.rpartition("/s")[0] for name in plan.heldout_checkpoints()} | {
      claims.timing(g, kv_bound=True) for g in preset.fig6["groups"]}
  missing = {claim.id: [name for name in claim.needs if name not in measured]
             for claim in claims.preset_claims(preset)}
  assert not any(missing.values()), missing


def test_the_overall_eta_times_each_stage_left_by_its_kind():
  """Uptraining stages took 60 and 80 s, a conversion 4 s: two uptraining and one conversion
  stage left take 2 x 70 + 4 s; a fine-tuning stage, whose kind has not run, is counted apart."""
  done = {"uptrain": [60.0, 80.0], "convert": [4.0]}
  assert runner.estimate_left(done, ["uptrain-mini-mqa-mean-s1", "convert-mini-mqa-first",
                                     "uptrain-mini-gqa2-mean-s1", "finetune-mini-mha-s0-t"]) == (
                                         144.0, 1)
  assert runner.stage_kind("fig6-timing-kv-bound") == "fig6"


@pytest.mark.slow
def test_ctrl_c_stops_the_run_with_one_line_and_leaves_no_process(tmp_path):
  """Ctrl-C (SIGINT to the process group) while a stage runs: exit 130 with one line saying how
  to go on, no traceback, the stage not marked done, and runner, fork server and stage gone."""
  run = subprocess.Popen(
      [sys.executable, "-m", "gqa_flax.reproduce.cli", "--preset", "smoke", "--out",
       str(tmp_path / "out"), "--heartbeat", "1"], stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, start_new_session=True)
  for line in run.stdout:
    if "running prepare" in line:
      break
  run.stdout.readline()  # its first heartbeat: the stage is running
  os.killpg(run.pid, signal.SIGINT)
  code = run.wait(timeout=60)
  err = run.stderr.read().strip()
  assert code == 130, err[-3000:]
  assert err.splitlines()[-1].startswith("gqa-reproduce: interrupted") and \
      "Traceback" not in err, err[-3000:]
  assert not (tmp_path / "out" / "stages" / "prepare" / "DONE.json").exists()
  time.sleep(1)
  with pytest.raises(ProcessLookupError):
    os.killpg(run.pid, 0)  # nothing left in its process group


def test_a_rerun_removes_the_stage_logs_that_dead_runners_left(tmp_path, monkeypatch):
  """A host killed with SIGKILL leaves its stage's host-local log directory; the next run on
  the host removes those whose runner is dead and keeps a live runner's."""
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  left = tmp_path / f"gqa_reproduce_{dead.pid}_abc"
  live = tmp_path / f"gqa_reproduce_{os.getpid()}_def"
  other = tmp_path / "gqa_reproduce_notapid"
  for directory in (left, live, other):
    directory.mkdir()
    (directory / "log.txt").write_text("stage output\n")
  runner.remove_dead_runners_logs()
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])
