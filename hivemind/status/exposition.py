"""Counters, gauges and histograms rendered in the Prometheus text exposition format.

The worker exports a dozen fixed metrics; prometheus_client brought ~1.6 MiB of resident imports
(its HTTP server, WSGI and gzip helpers, the OpenMetrics parser) into every idle daemon for that.
The output follows what prometheus_client's generate_latest writes for the same metrics (sorted
labels, Go float formatting, `_total` counters, `_created` series), so scrapes and dashboards see
no difference; tests/test_status_api.py checks it against the reference parser and renderer.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=1.0.0; charset=utf-8"

LabelValues = tuple[str, ...]


def go_float(value: float) -> str:
    """A sample value as Prometheus (Go) writes it: 1.0, 0.05, 8.589934592e+09, +Inf."""
    d = float(value)
    if math.isinf(d):
        return "+Inf" if d > 0 else "-Inf"
    if math.isnan(d):
        return "NaN"
    s = repr(d)
    dot = s.find(".")
    # Go switches to an exponent sooner than Python's repr does.
    if d > 0 and dot > 6:
        mantissa = f"{s[0]}.{s[1:dot]}{s[dot + 1:]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return s


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    if not labels:
        return f"{name} {go_float(value)}\n"
    inner = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}} {go_float(value)}\n"


def _header(name: str, help_text: str, kind: str) -> str:
    return f"# HELP {name} {_escape_help(help_text)}\n# TYPE {name} {kind}\n"


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name}: labels {sorted(labels)} != {sorted(self.labelnames)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def _labels(self, key: LabelValues) -> dict[str, str]:
        return dict(zip(self.labelnames, key, strict=True))

    def render(self) -> str:
        raise NotImplementedError


class Gauge(_Metric):
    """A value per label set; an unlabelled gauge starts at 0."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        self._values: dict[LabelValues, float] = {} if self.labelnames else {(): 0.0}

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def render(self) -> str:
        with self._lock:
            items = list(self._values.items())
        return _header(self.name, self.help, "gauge") + "".join(
            _sample(self.name, self._labels(k), v) for k, v in items)


class Counter(_Metric):
    """An unlabelled count that only goes up, exposed as `<name>_total` with `<name>_created`."""

    kind = "counter"

    def __init__(self, name: str, help_text: str) -> None:
        super().__init__(name, help_text)
        self._value = 0.0
        self._created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        with self._lock:
            self._value += amount

    def render(self) -> str:
        with self._lock:
            value = self._value
        total, created = f"{self.name}_total", f"{self.name}_created"
        return (_header(total, self.help, "counter") + _sample(total, {}, value)
                + _header(created, self.help, "gauge") + _sample(created, {}, self._created))


class _HistogramSeries:
    def __init__(self, n_buckets: int) -> None:
        self.counts = [0.0] * n_buckets   # per bucket, not cumulative; the last is +Inf
        self.sum = 0.0
        self.created = time.time()


class Histogram(_Metric):
    """Observations counted into fixed upper bounds (+Inf added); an unlabelled histogram shows
    its zero buckets from the start, a labelled one each label set once it was observed."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: Iterable[float],
                 labelnames: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labelnames)
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        self._series: dict[LabelValues, _HistogramSeries] = {}
        if not self.labelnames:
            self._series[()] = _HistogramSeries(len(self.bounds))

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = _HistogramSeries(len(self.bounds))
            for i, bound in enumerate(self.bounds):
                if value <= bound:
                    series.counts[i] += 1
                    break
            series.sum += value

    def render(self) -> str:
        with self._lock:
            items = [(k, list(s.counts), s.sum, s.created) for k, s in self._series.items()]
        out = [_header(self.name, self.help, "histogram")]
        created: list[str] = []
        for key, counts, total, made in items:
            labels = self._labels(key)
            running = 0.0
            for bound, count in zip(self.bounds, counts, strict=True):
                running += count
                out.append(_sample(f"{self.name}_bucket", {**labels, "le": go_float(bound)}, running))
            out.append(_sample(f"{self.name}_count", labels, running))
            out.append(_sample(f"{self.name}_sum", labels, total))
            created.append(_sample(f"{self.name}_created", labels, made))
        if created:
            out.append(_header(f"{self.name}_created", self.help, "gauge"))
            out.extend(created)
        return "".join(out)


class Registry:
    """Metrics in the order they were added, rendered together."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def add(self, metric: _Metric) -> None:
        if any(m.name == metric.name for m in self._metrics):
            raise ValueError(f"metric {metric.name} registered twice")
        self._metrics.append(metric)

    def render(self) -> bytes:
        return "".join(m.render() for m in self._metrics).encode()
