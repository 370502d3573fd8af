"""The fit search of ``moe_jax.benchmarks.offload_fit`` on made-up compiles.

No compiler here: a fake ``compile_fn`` returns device bytes from a line
whose crossing with the HBM limit is worked out by hand, so the search's
answer and its number of compiles can be checked exactly.
"""

import pytest

from moe_jax.benchmarks import offload_fit

GIB = 2**30
HBM = 95 * GIB


def _record(setting, e, device, host=0, alias=None):
  """A compile record; ``alias=None``: one made before host aliasing was read."""
  host_bytes = {"argument": host, "temp": 0, "output": host}
  total = 2 * host
  if alias is not None:
    total = 2 * host - alias
    host_bytes.update(alias=alias, total=total)
  return {"setting": setting, "num_experts": e, "fits": device <= HBM,
          "device_bytes": {"total": device, "argument": device // 2},
          "host_bytes": host_bytes, "hbm_bytes_per_chip": HBM,
          "host_offload": {"host_total_bytes": total,
                           "host_memory_bytes_per_chip": 100 * GIB, "host_fits": None,
                           "host_to_device_bytes": 1, "device_to_host_bytes": 1,
                           "transfer_s": 0.0},
          "params": {"total": 1000 * e, "active": 10}, "roofline_step_s": 0.1}


def test_search_finds_the_crossing_of_a_linear_memory_curve():
  # 10 GiB fixed + 0.5 GiB per expert: 95 GiB is crossed at 170 experts, so
  # 168 (a multiple of 4) fits and 172 does not.
  calls = []

  def fake(setting, e):
    calls.append(e)
    return _record(setting, e, 10 * GIB + e * GIB // 2)

  points = offload_fit.search("none", fake, {})
  row = offload_fit.summarize("none", points)
  assert row["num_experts"] == 168 and row["smallest_not_fitting"] == 172
  assert calls[:2] == [128, 256] and len(calls) <= offload_fit.MAX_COMPILES


def test_search_stops_where_the_host_ram_binds_first():
  # Device: 10 GiB + 0.1 GiB per expert (95 GiB only at 850 experts); host:
  # 0.4 GiB per expert, aliased, against 100 GiB per chip -> 250, so 248
  # fits both and 252 does not fit the host.
  def fake(setting, e):
    rec = _record(setting, e, 10 * GIB + e * GIB // 10, host=int(e * 0.4 * GIB),
                  alias=int(e * 0.4 * GIB))
    off = rec["host_offload"]
    off["host_fits"] = off["host_total_bytes"] <= off["host_memory_bytes_per_chip"]
    return rec

  points = offload_fit.search("optimizer+params+host_update", fake, {})
  row = offload_fit.summarize("optimizer+params+host_update", points)
  assert row["num_experts"] == 248 and row["smallest_not_fitting"] == 252
  assert points[252]["fits"] and not offload_fit.fits(points[252])


def test_records_without_host_alias_count_the_donated_state_once():
  old = _record("optimizer", 128, 50 * GIB, host=40 * GIB)
  new = offload_fit.migrate_host_alias(old)
  # arguments 40 + outputs 40 - aliased 40 + temporaries 0.
  assert new["host_bytes"]["alias"] == 40 * GIB
  assert new["host_bytes"]["total"] == new["host_offload"]["host_total_bytes"] == 40 * GIB
  assert new["host_offload"]["host_fits"] is True and new["host_alias_inferred"]
  # A record that already carries XLA's alias is left as it is.
  current = _record("optimizer", 128, 50 * GIB, host=40 * GIB, alias=40 * GIB)
  assert offload_fit.migrate_host_alias(current) is current


def test_host_limited_count_is_read_off_the_host_bytes_line():
  # Host state 0.4 GiB per expert, aliased: 100 GiB at 250 experts -> 248.
  points = {e: _record("x", e, 80 * GIB, host=int(e * 0.4 * GIB), alias=int(e * 0.4 * GIB))
            for e in (128, 256)}
  assert offload_fit._host_limited(points) == 248


@pytest.mark.parametrize("setting", list(offload_fit.SETTINGS))
def test_every_setting_has_a_start_and_valid_bindings(setting):
  assert setting in offload_fit.START
  binds = offload_fit.bindings(setting, 64)
  assert binds[-1] == "NUM_EXPERTS = 64" and all(" = " in b for b in binds)


def test_run_writes_json_that_a_rerun_reuses_and_a_table(tmp_path, monkeypatch):
  calls = []

  def fake(setting, e, topology):
    calls.append((setting, e, topology))
    return _record(setting, e, 10 * GIB + e * GIB // 2, host=0, alias=0)

  monkeypatch.setattr(offload_fit, "compile_point", fake)
  path = str(tmp_path / "fit.json")
  data = offload_fit.run(["none"], path, topology="v6e-4", start=(32, 64))
  assert calls[0] == ("none", 32, "v6e-4") and data["topology"] == "v6e-4"
  assert data["results"][0]["num_experts"] == 168
  n = len(calls)
  offload_fit.run(["none"], path, topology="v6e-4", start=(32, 64))
  assert len(calls) == n            # every point came from the file
  offload_fit.run(["none"], path, topology="v5p-8", start=(32, 64))
  assert len(calls) > n             # another topology does not reuse them
  text = offload_fit.table(data)
  assert "| none | 168 (172) | 0.00 B | 1.00 | 94.0 |" in text and "(of 95.0)" in text


def test_an_extra_point_is_compiled_once_and_reported_as_its_own_row(tmp_path, monkeypatch):
  calls = []

  def fake(setting, e, topology):
    calls.append((setting, e))
    return _record(setting, e, 10 * GIB + e * GIB // 2, host=0, alias=0)

  monkeypatch.setattr(offload_fit, "compile_point", fake)
  path = str(tmp_path / "fit.json")
  data = offload_fit.run(["none"], path, points=[("none", 160)])
  assert calls.count(("none", 160)) == 1       # reused if the search compiled it
  row = data["results"][-1]
  assert row["setting"] == "none" and row["num_experts"] == 160
  assert row["device_fits"] and row["params_ratio_to_none"] == pytest.approx(160 / 168)
  assert "| none, one compile | 160 (device fits; host fits) |" in offload_fit.table(data)
