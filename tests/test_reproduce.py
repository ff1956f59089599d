"""gqa-reproduce: the smoke preset end to end (CI), resumability, presets and bad input."""
import json
import math
import os
import subprocess
import sys

import pytest

from gqa_flax.reproduce import claims, cli, statistics
from gqa_flax.reproduce.presets import Variant, load_preset
from gqa_flax.reproduce.stages import Plan


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
  assert "MHA-XXL" in table["paper"]["rows"]
  markdown = (out / "table1.md").read_text()
  assert "| MQA-tiny | 0.05 | mean |" in markdown and "paper" in markdown
  for n in (3, 4, 5, 6):
    png = out / f"fig{n}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
  assert set(by_id) == {"C1", "C2", "C2b", "C3a", "C3b", "C4", "C5", "C6"}
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
  assert {c for c, claim in by_id.items() if claim["verdict"] != "not run"} == {"C2", "C4", "C5"}
  assert by_id["C1"]["missing"] == ["heldout/tiny-gqa2-a0.05-mean"]
  heldout = json.loads((out / "stages" / "heldout" / "result.json").read_text())
  assert heldout["num_examples"] == 16 and all(
      len(losses) == 16 and all(math.isfinite(x) and x > 0 for x in losses)
      for losses in heldout["losses"].values())
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
  uptrain = stages["uptrain-mini-mqa-a0.1-mean"].argv
  assert uptrain[1:3] == ["-m", "gqa_flax.train"]
  assert "--gin_file=reproduce/mini/uptrain.gin" in uptrain
  assert "--gin.TRAIN_STEPS=1100" in uptrain
  # alpha 0.1 continues the alpha 0.05 run of the same conversion (same MODEL_DIR).
  assert [a for a in uptrain if "MODEL_DIR" in a] == [
      a for a in stages["uptrain-mini-mqa-a0.05-mean"].argv if "MODEL_DIR" in a]
  names = list(stages)
  assert names.index("uptrain-mini-mqa-a0.05-mean") < names.index("uptrain-mini-mqa-a0.1-mean")
  assert stages["convert-mini-mqa-random"].argv[1:3] == ["-m", "gqa_flax.convert"]
  assert "--method=random" in stages["convert-mini-mqa-random"].argv
  # alpha 0 fine-tunes the converted checkpoint; MHA the pre-trained one.
  finetune = stages["finetune-mini-gqa2-a0-mean-gqa_mini_title"].argv
  assert f'--gin.INITIAL_CHECKPOINT_PATH="{tmp_path}/runs/convert-mini-gqa2-mean/checkpoint_1000"' \
      in finetune
  assert "--gin.TRAIN_STEPS=1100" in finetune
  assert len(preset.variants) == 9 and len(preset.table_variants) == 3
  # The held-out losses: every conversion right after it (alpha 0) and every uptrained run.
  heldout = stages["heldout"].argv
  assert heldout[1:3] == ["-m", "gqa_flax.reproduce.heldout"]
  assert (f"--score=heldout/mini-mqa-a0-mean={tmp_path}/runs/convert-mini-mqa-mean/"
          "checkpoint_1000") in heldout
  assert (f"--score=heldout/mini-mqa-a0.05-mean={tmp_path}/runs/uptrain-mini-mqa-mean/"
          "checkpoint_1050") in heldout
  assert f"--score=heldout/mini-mha={tmp_path}/runs/pretrain-mini/checkpoint_1000" in heldout
  assert names.index("heldout") > names.index("uptrain-mini-mqa-a0.1-mean")
  for stage in stages.values():
    for arg in stage.argv:
      if arg.startswith("--gin_file=") or (arg.startswith("--eval=")):
        gin_file = arg.split("=", 1)[1].split(":", 1)[-1].split("=")[0]
        assert os.path.isfile(os.path.join("configs", gin_file)), arg


def test_paper_preset_uses_public_checkpoints_and_paper_tasks():
  preset = load_preset("paper")
  assert preset.pretrain_steps == 1_000_000
  assert [v.label for v in preset.table_variants] == ["MHA-Large", "MHA-XXL", "MQA-XXL",
                                                      "GQA-8-XXL"]
  assert Variant("XXL", 8, 0.05, "mean").key == "xxl-gqa8-a0.05-mean"
  plan = Plan(preset, "/out", None)
  names = [s.name for s in plan.stages()]
  assert not any(n.startswith(("prepare", "pretrain")) for n in names)
  assert len([n for n in names if n.startswith("finetune-")]) == 11 * 7


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


def test_the_mini_preset_measures_what_every_claim_but_c6_needs(tmp_path):
  """`make reproduce` decides C1-C5: its held-out stage and Figure 6 give every measurement
  they need (C6 needs a second, smaller model, which the mini preset does not train)."""
  preset = load_preset("mini")
  plan = Plan(preset, str(tmp_path), str(tmp_path / "data"))
  measured = set(plan.heldout_checkpoints()) | {claims.timing(g) for g in preset.fig6["groups"]}
  missing = {claim.id: [name for name in claim.needs if name not in measured]
             for claim in claims.preset_claims(preset)}
  assert {claim for claim, names in missing.items() if names} == {"C6"}, missing
