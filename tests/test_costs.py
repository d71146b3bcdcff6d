"""Stochastic costs (desim/costs.py): distributions, named streams, determinism, CRN and the mean mode."""
from __future__ import annotations

import numpy as np
import pytest

from desim.costs import BLOCK, CostSampler, lognormal_median
from desim.errors import DesimInputError
from desim.profile import HostProfile, load_profile
from desim.vm import run_scenario

from conftest import scenario


def _profile(**dists) -> HostProfile:
    data = load_profile("tdp-icelake").model_dump()
    for name, d in dists.items():
        data["costs"][name]["dist"] = d
    return HostProfile.model_validate(data)


LOGN = {"kind": "lognormal", "sigma": 0.5}
TABLE = {"kind": "quantiles", "p": [0, 0.5, 0.9, 0.99, 1], "ns": [100, 200, 400, 2000, 5000]}


def test_draws_have_the_cost_as_mean_and_the_shape_of_the_dist():
    prof = _profile(fault_handle=LOGN, host_alloc_4k=TABLE)
    v = CostSampler(prof, "sampled", seed=3).view("vcpu0")
    fh = np.array([v.fault_handle for _ in range(40_000)])
    mean = prof.costs["fault_handle"].value
    assert fh.mean() == pytest.approx(mean, rel=0.02)
    assert np.median(fh) == pytest.approx(lognormal_median(mean, 0.5), rel=0.02)
    assert np.std(np.log(fh)) == pytest.approx(0.5, rel=0.03)
    ha = np.array([v.host_alloc_4k for _ in range(40_000)])
    value = prof.costs["host_alloc_4k"].value
    scale = value / prof.costs["host_alloc_4k"].dist.table_mean()
    assert ha.mean() == pytest.approx(value, rel=0.03)
    assert np.percentile(ha, 90) == pytest.approx(400 * scale, rel=0.03)
    assert ha.min() >= 100 * scale and ha.max() <= 5000 * scale
    assert v.vm_exit == prof.costs["vm_exit"].value  # no dist: the value, every time


def test_mean_mode_reads_every_value_and_draws_nothing():
    prof = _profile(fault_handle=LOGN)
    v = CostSampler(prof, "mean", seed=3).view("vcpu0")
    assert not v.stochastic
    assert {v.fault_handle for _ in range(10)} == {prof.costs["fault_handle"].value}


def test_same_seed_same_draws_whatever_the_interleaving():
    prof = _profile(fault_handle=LOGN, vm_exit=TABLE)
    a = CostSampler(prof, "sampled", seed=9, replication=2)
    b = CostSampler(prof, "sampled", seed=9, replication=2)
    va, vb = a.view("vcpu1"), b.view("vcpu1")
    xs = [va.fault_handle for _ in range(BLOCK + 5)]
    ys = []
    for _ in range(BLOCK + 5):  # interleave another cost and another actor: vcpu1's draws do not move
        b.view("vcpu0").fault_handle
        vb.vm_exit
        ys.append(vb.fault_handle)
    assert xs == ys
    other = CostSampler(prof, "sampled", seed=9, replication=3).view("vcpu1")
    assert [other.fault_handle for _ in range(5)] != xs[:5]


@pytest.mark.parametrize("dist", [LOGN, TABLE], ids=["lognormal", "quantiles"])
def test_peeking_many_draws_at_once_gives_the_numbers_read_one_by_one(dist):
    """The fast engine peeks a block's costs as an array (several BLOCKs drawn in one numpy call), then
    consumes only those of the faults it takes: the stream is the one a reader of single values sees."""
    prof = _profile(fault_handle=dist)
    one = CostSampler(prof, "sampled", seed=4).view("vcpu0")
    xs = [one.fault_handle for _ in range(5 * BLOCK)]
    d = CostSampler(prof, "sampled", seed=4).view("vcpu0").draws("fault_handle")
    got = [d.next() for _ in range(7)]
    for k, used in ((3 * BLOCK + 11, 2 * BLOCK), (10, 3), (BLOCK, BLOCK - 1)):
        peeked = d.peek_many(k)
        assert peeked.tolist() == xs[len(got):len(got) + k]
        d.i += used
        got += peeked[:used].tolist()
        got.append(d.next())
    assert got == xs[:len(got)]


def test_per_unit_costs_cannot_be_distributions():
    with pytest.raises(Exception, match="spte_zap.dist: not allowed"):
        _profile(spte_zap=LOGN)
    with pytest.raises(Exception, match="p must increase strictly from 0 to 1"):
        _profile(fault_handle={"kind": "quantiles", "p": [0, 0.5, 0.4, 1], "ns": [1, 2, 3, 4]})
    with pytest.raises(Exception, match="needs sigma"):
        _profile(fault_handle={"kind": "lognormal"})


def test_an_override_of_the_value_keeps_the_shape():
    prof = load_profile("shadow-pvm").with_overrides(costs={"fault_handle": 2000.0})
    c = prof.costs["fault_handle"]
    assert c.value == 2000.0 and c.dist is not None and c.dist.kind == "quantiles"


def _sc(costs: str, **kw):
    return scenario(vcpus=2, ram_mib=8, profile="shadow-pvm", costs=costs, name="costs", **kw)


def test_a_run_with_sampled_costs_is_bit_identical_for_a_seed_and_has_a_spread():
    a = run_scenario(_sc("sampled"), "fast", seed=4, replication=1).metrics
    b = run_scenario(_sc("sampled"), "fast", seed=4, replication=1).metrics
    assert a == b
    assert a["fault_latency_p99_ns"] > 1.2 * a["fault_latency_p50_ns"]
    c = run_scenario(_sc("sampled"), "fast", seed=5, replication=1).metrics
    assert c["completion_ns"] != a["completion_ns"]
    assert c["faults"] == a["faults"]  # costs move times, not what faults


def test_mean_mode_is_the_constant_cost_model():
    m = run_scenario(_sc("mean"), "fast", seed=4).metrics
    # one vCPU-path cost per kind of fault (up to the rounding of end - start at different times)
    assert m["fault_latency_p50_ns"] == pytest.approx(m["fault_latency_p90_ns"], rel=1e-12)
    prof = load_profile("shadow-pvm")
    stripped = HostProfile.model_validate({**prof.model_dump(), "costs": {
        k: {kk: vv for kk, vv in c.items() if kk != "dist"} for k, c in prof.model_dump()["costs"].items()}})
    from desim.vm import Vm

    plain = Vm(_sc("sampled"), "fast", 4, 0, profile=stripped).run().metrics
    assert plain == m  # costs = "mean" is exactly a profile without distributions


def test_both_policies_draw_the_same_populate_costs():
    """CRN: the populate phase is the same work under both policies, so it takes the same time."""
    phases = [{"name": "populate", "pattern": "sequential", "slot": 0},
              {"name": "work", "pattern": "sequential", "slot": 0, "passes": 2,
               "memslot_ops": [{"at_us": 50, "op": "delete", "slot": 1}]}]
    sc = scenario(vcpus=2, ram_mib=8, profile="shadow-pvm", phases=phases, name="crn",
                  extra_slots=[{"id": 1, "gpa": 1 << 30, "size": 2 << 20}])
    f = run_scenario(sc, "fast", seed=7).metrics
    t = run_scenario(sc, "targeted", seed=7).metrics
    assert f["phase_populate_ns"] == t["phase_populate_ns"]


def test_bad_costs_mode_is_one_line_naming_the_field():
    with pytest.raises(DesimInputError) as e:
        _sc("median")
    assert "costs" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["tdp-icelake", "legacy-2020", "shadow-pvm"])
def test_every_builtin_profile_gives_faults_a_spread_and_says_where_its_shape_comes_from(name):
    """The symptom the tails work began with: fault p50 = p99 on the default profile. Each built-in
    profile's fault path now draws from a documented shape; the mean mode stays constant."""
    prof = load_profile(name)
    for k in ("fault_handle", "host_alloc_4k"):
        d = prof.costs[k].dist
        assert d is not None and d.kind == "quantiles" and "measured" in (prof.costs[k].source + (d.source or ""))
        assert d.table_mean() > 0
    k4 = {"backing": "4k"}  # 4 KiB host pages: every first touch allocates (THP: one in 512)
    sc = scenario(vcpus=1, ram_mib=8, profile=name, costs="sampled", name="spread", kernel=k4)
    m = run_scenario(sc, "fast", seed=2).metrics
    assert m["fault_latency_p99_ns"] > 1.2 * m["fault_latency_p50_ns"]
    c = run_scenario(scenario(vcpus=1, ram_mib=8, profile=name, costs="mean", name="spread", kernel=k4), "fast",
                     seed=2).metrics
    assert c["fault_latency_p50_ns"] == pytest.approx(c["fault_latency_p90_ns"], rel=1e-9)
