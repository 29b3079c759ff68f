import math

import pytest

from rocket_deploy.runtime.bench import MIN_RUNS_FOR_PERCENTILES, environment, few_runs_warning, latency_stats


def test_latency_stats_on_known_numbers():
    s = latency_stats([1.0, 2.0, 3.0, 4.0, 10.0])
    assert s["min"] == 1.0 and s["max"] == 10.0 and s["p50"] == 3.0 and s["mean"] == 4.0
    assert s["p95"] == pytest.approx(4.0 + 0.8 * 6.0)      # linear between the 4th and 5th order statistic
    assert s["p90"] == pytest.approx(4.0 + 0.6 * 6.0)
    assert s["stddev"] == pytest.approx(math.sqrt((9 + 4 + 1 + 0 + 36) / 5))


def test_few_runs_warning_and_environment():
    assert few_runs_warning(MIN_RUNS_FOR_PERCENTILES) is None
    assert "--runs 20" in few_runs_warning(5)
    env = environment(None, 2)
    assert env["threads"] == 2 and env["cpu"] and "torch" in env["versions"]
    with pytest.raises(ValueError):
        latency_stats([])
