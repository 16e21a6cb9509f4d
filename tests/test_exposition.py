"""The worker's own Prometheus text exposition against the reference library (prometheus_client,
kept for the tests): same families, samples and values, and parseable by its parser."""

from __future__ import annotations

import math

import prometheus_client as ref
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hivemind.status import exposition as ex
from hivemind.status.prom import DURATION_BUCKETS, WorkerMetrics


def _without_created(text: str) -> list[str]:
    # The _created series carry creation timestamps: equal only in shape.
    return [line if "_created" not in line or line.startswith("#") else line.rsplit(" ", 1)[0]
            for line in text.splitlines()]


def test_same_text_as_prometheus_client() -> None:
    mine = ex.Registry()
    theirs = ref.CollectorRegistry(auto_describe=True)
    g = ex.Gauge("t_gauge", "A gauge\nwith a \\ newline.", ["kind"])
    rg = ref.Gauge("t_gauge", "A gauge\nwith a \\ newline.", ["kind"], registry=theirs)
    c = ex.Counter("t_failures", "Failures.")
    rc = ref.Counter("t_failures", "Failures.", registry=theirs)
    h = ex.Histogram("t_seconds", "Durations.", DURATION_BUCKETS, ["outcome"])
    rh = ref.Histogram("t_seconds", "Durations.", ["outcome"], buckets=DURATION_BUCKETS, registry=theirs)
    u = ex.Histogram("t_latency", "Latency.", (0.05, 0.5, 2.5))
    ru = ref.Histogram("t_latency", "Latency.", buckets=(0.05, 0.5, 2.5), registry=theirs)
    plain = ex.Gauge("t_plain", "Unlabelled.")
    ref.Gauge("t_plain", "Unlabelled.", registry=theirs)   # an unset unlabelled gauge: 0
    for m in (g, c, h, u, plain):
        mine.add(m)
    for kind, value in (("total", 8 * 2**30), ("odd \"q\" \\ \n", 0.1), ("big", 123456789.0), ("tiny", 1e-7)):
        g.set(value, kind=kind)
        rg.labels(kind=kind).set(value)
    c.inc()
    c.inc(2.5)
    rc.inc()
    rc.inc(2.5)
    for outcome, value in (("exited", 3.2), ("killed", 99999.0), ("exited", 1.0), ("exited", 0.0)):
        h.observe(value, outcome=outcome)
        rh.labels(outcome=outcome).observe(value)
    u.observe(0.3)
    ru.observe(0.3)
    assert _without_created(mine.render().decode()) == _without_created(ref.generate_latest(theirs).decode())
    assert ex.CONTENT_TYPE == ref.CONTENT_TYPE_LATEST


def test_worker_metrics_parse() -> None:
    m = WorkerMetrics("1.2.3", "node-x")
    m.observe_task_duration(4.0, "timeout")
    m.heartbeat_failed()
    families = {f.name: f for f in text_string_to_metric_families(m.render().decode())}
    assert families["hivemind_build_info"].samples[0].labels == {"version": "1.2.3", "node_id": "node-x"}
    assert families["hivemind_heartbeat_failures"].samples[0].value == 1.0
    counts = [s for s in families["hivemind_task_duration_seconds"].samples if s.name.endswith("_count")]
    assert counts[0].labels == {"outcome": "timeout"} and counts[0].value == 1.0


@pytest.mark.parametrize(("value", "text"), [(1, "1.0"), (0.05, "0.05"), (8589934592, "8.589934592e+09"),
                                              (math.inf, "+Inf"), (-math.inf, "-Inf"), (-12345678.0, "-12345678.0")])
def test_go_float(value: float, text: str) -> None:
    assert ex.go_float(value) == text


def test_wrong_labels_and_duplicates_refused() -> None:
    g = ex.Gauge("t", "T.", ["kind"])
    with pytest.raises(ValueError):
        g.set(1, state="x")
    r = ex.Registry()
    r.add(g)
    with pytest.raises(ValueError):
        r.add(ex.Gauge("t", "T again."))
    with pytest.raises(ValueError):
        ex.Counter("c", "C.").inc(-1)
