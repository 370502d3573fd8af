"""The MoE layer benchmark runs and reports the fields the issue asks for."""

import pytest

from moe_jax.benchmarks import moe_layer


@pytest.mark.slow  # end-to-end; pytest -m slow
def test_compare_reports_all_fields(capsys):
  results = moe_layer.main([
      "--json", "--compare", "--tokens", "256", "--seq", "32", "--d_model", "16",
      "--d_ff", "32", "--group_size", "32", "--steps", "1", "--mesh", "data=2,expert=4"])
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
  # dense, the default strategy ("moe"), the other strategies, dropless
  assert len(lines) == len(results) == 6
  assert {r["dispatch"] for k, r in results.items() if k.startswith("moe")} == {
      "scatter", "gather", "einsum", "sort"}
  for kind in results:
    r = results[kind]
    for key in ("median_step_s", "tokens_per_s", "compile_s", "temp_bytes",
                "argument_bytes", "flops_per_device", "all_to_all",
                "assignments_dropped"):
      assert key in r, (kind, key)
  assert results["moe"]["all_to_all"] > 0 and results["dense"]["all_to_all"] == 0
  # Same active FLOPs per token: MoE does capacity_factor (1.25) x the dense
  # FLOPs in its experts, plus a router.
  ratio = results["moe"]["flops_per_device"] / results["dense"]["flops_per_device"]
  assert 1.1 < ratio < 1.6
  assert all("ratio_vs_dense" in r for k, r in results.items() if k != "dense")


def test_profile_attributes_time_to_the_layer_parts(capsys):
  rows = moe_layer.main([
      "--json", "--profile", "--tokens", "256", "--seq", "32", "--d_model", "16",
      "--d_ff", "32", "--group_size", "32", "--steps", "1", "--mesh", "data=2,expert=4"])
  parts = rows["moe"]["parts_ms"]
  assert {"router", "combine", "all-to-all"} <= set(parts), parts
  assert abs(sum(rows["moe"]["fractions"].values()) - 1.0) < 0.01
