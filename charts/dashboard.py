"""The Grafana dashboard of finetune-operator, as code (grafana-foundation-sdk, Grafana 11.6).

    python charts/dashboard.py            # print the dashboard JSON
    python charts/dashboard.py --write    # write charts/finetune-operator/dashboards/*.json

The chart ships the JSON in a ConfigMap labelled ``grafana_dashboard: "1"``; a test fails if the
committed JSON differs from what this script generates.

Label conventions (set by the chart's PodMonitor, see templates/podmonitor.yaml): trainer series
carry ``namespace``, ``pod`` and ``finetunejob`` (the FineTuneJob's name). Each node's local rank 0
serves metrics; losses, steps and tokens are global, so they are aggregated with ``max`` per job.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders import common as gc
from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus as gp
from grafana_foundation_sdk.builders import stat as gstat
from grafana_foundation_sdk.builders import timeseries as gts
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dm

from finetune_trainer import names as n

UID = "finetune-operator"
OUTPUT = Path(__file__).resolve().parent / "finetune-operator" / "dashboards" / f"{UID}.json"
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
#: The selector every trainer query starts from (Grafana fills in the variables).
JOB = f'namespace=~"$namespace", {n.METRIC_JOB_LABEL}=~"$job"'
RATE = "$__rate_interval"
#: What trainer series are grouped by, and how a job is named in a legend.
BY_JOB = f"namespace, {n.METRIC_JOB_LABEL}"
JOB_NAME = "{{" + n.METRIC_JOB_LABEL + "}}"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


def _target(q: Query, ref: str) -> gp.Dataquery:
    return (
        gp.Dataquery()
        .expr(q.expr)
        .legend_format(q.legend)
        .ref_id(ref)
        .datasource(DATASOURCE)
        .range()
    )


def timeseries(
    title: str,
    description: str,
    unit: str,
    queries: list[Query],
    *,
    width: int = 12,
    min_value: float | None = None,
    max_value: float | None = None,
) -> gts.Panel:
    panel = (
        gts.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(8)
        .span(width)
        .line_width(1)
        .fill_opacity(10)
        .show_points(common.VisibilityMode.NEVER)
        .legend(
            gc.VizLegendOptions()
            .display_mode(common.LegendDisplayMode.LIST)
            .placement(common.LegendPlacement.BOTTOM)
            .show_legend(True)
        )
        .tooltip(gc.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI))
    )
    if min_value is not None:
        panel = panel.min(min_value)
    if max_value is not None:
        panel = panel.max(max_value)
    for i, q in enumerate(queries):
        panel = panel.with_target(_target(q, chr(ord("A") + i)))
    return panel


def stat(
    title: str, description: str, unit: str, queries: list[Query], width: int = 6
) -> gstat.Panel:
    panel = (
        gstat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .height(5)
        .span(width)
        .graph_mode(common.BigValueGraphMode.AREA)
        .color_mode(common.BigValueColorMode.VALUE)
        .reduce_options(gc.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
    )
    for i, q in enumerate(queries):
        panel = panel.with_target(_target(q, chr(ord("A") + i)))
    return panel


def by_job(metric: str, agg: str = "max") -> str:
    return f"{agg} by ({BY_JOB}) ({metric}{{{JOB}}})"


def quantile(q: float, histogram: str) -> Query:
    expr = (
        f"histogram_quantile({q}, sum by ({BY_JOB}, le) "
        f"(rate({n.bucket(histogram)}{{{JOB}}}[{RATE}])))"
    )
    return Query(expr, f"{JOB_NAME} p{round(q * 100)}")


def variables() -> list[gd.DatasourceVariable | gd.QueryVariable]:
    namespace = (
        gd.QueryVariable("namespace")
        .label("Namespace")
        .datasource(DATASOURCE)
        .query(f"label_values({n.total(n.TRAIN_STEPS)}, namespace)")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )
    job = (
        gd.QueryVariable("job")
        .label("FineTuneJob")
        .datasource(DATASOURCE)
        .query(
            f'label_values({n.total(n.TRAIN_STEPS)}{{namespace=~"$namespace"}}, '
            f"{n.METRIC_JOB_LABEL})"
        )
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )
    datasource = gd.DatasourceVariable("datasource").label("Data source").type("prometheus")
    return [datasource, namespace, job]


def build() -> dm.Dashboard:
    legend = "{{namespace}}/" + JOB_NAME
    d = (
        gd.Dashboard("FineTune jobs")
        .uid(UID)
        .description(
            "FineTuneJobs: phases, training loss, throughput, MFU, step time, memory, data "
            "loading, checkpoints, and the operator's reconciles."
        )
        .tags(["finetune", "llm", "training"])
        .editable()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .time("now-6h", "now")
        .refresh("30s")
        .timezone("browser")
        .variables(variables())  # type: ignore[arg-type]
    )
    d = d.with_row(gd.Row("Jobs"))
    d = d.with_panel(
        stat(
            "FineTuneJobs by phase",
            "How many FineTuneJobs the operator knows in each phase.",
            "short",
            [Query(f"sum by (phase) ({n.OPERATOR_JOBS})", "{{phase}}")],
            width=12,
        )
    )
    d = d.with_panel(
        timeseries(
            "Progress",
            "Optimizer steps done over total steps.",
            "percentunit",
            [Query(by_job(n.TRAIN_PROGRESS), legend)],
            min_value=0,
            max_value=1,
        )
    )
    d = d.with_row(gd.Row("Training"))
    d = d.with_panel(
        timeseries(
            "Training loss",
            "Mean loss per target token of the last optimizer step (nats).",
            "none",
            [Query(by_job(n.TRAIN_LOSS), legend)],
        )
    )
    d = d.with_panel(
        timeseries(
            "Eval loss",
            "Mean loss per target token on the held-out split, at each evaluation (nats).",
            "none",
            [Query(by_job(n.EVAL_LOSS), legend)],
        )
    )
    d = d.with_panel(
        timeseries(
            "Tokens per second",
            "Real (non-padding) tokens trained on per second, whole job.",
            "short",
            [
                Query(
                    f"max by ({BY_JOB}) (rate({n.total(n.TRAIN_TOKENS)}{{{JOB}}}[{RATE}]))",
                    legend,
                )
            ],
        )
    )
    d = d.with_panel(
        timeseries(
            "Model FLOPs utilisation",
            "Achieved model FLOPs over the accelerators' peak (0 when the peak is unknown).",
            "percentunit",
            [Query(by_job(n.TRAIN_MFU), legend)],
            min_value=0,
        )
    )
    d = d.with_panel(
        timeseries(
            "Step time",
            "Wall time of one optimizer step: median and 95th percentile.",
            "s",
            [
                quantile(0.5, n.TRAIN_STEP_DURATION),
                quantile(0.95, n.TRAIN_STEP_DURATION),
            ],
        )
    )
    d = d.with_panel(
        timeseries(
            "Learning rate",
            "Learning rate of the last step.",
            "none",
            [Query(by_job(n.TRAIN_LEARNING_RATE), legend)],
        )
    )
    d = d.with_row(gd.Row("Resources"))
    d = d.with_panel(
        timeseries(
            "Accelerator memory (peak allocated)",
            "Peak memory allocated per rank (GPU memory; peak RSS on CPU).",
            "bytes",
            [
                Query(
                    f"max by ({BY_JOB}, rank) ({n.GPU_MEMORY}{{{JOB}}})",
                    JOB_NAME + " rank {{rank}}",
                )
            ],
        )
    )
    d = d.with_panel(
        timeseries(
            "Data-loader wait per step",
            "Mean time a step waited for its batches; high values mean the GPUs starve.",
            "s",
            [
                Query(
                    f"sum by ({BY_JOB}) "
                    f"(rate({n.hsum(n.DATALOADER_WAIT)}{{{JOB}}}[{RATE}])) / "
                    f"sum by ({BY_JOB}) "
                    f"(rate({n.count(n.DATALOADER_WAIT)}{{{JOB}}}[{RATE}]))",
                    legend,
                )
            ],
        )
    )
    d = d.with_panel(
        stat(
            "Time since last checkpoint",
            "Seconds since the last checkpoint was saved.",
            "s",
            [
                Query(
                    f"time() - max by ({BY_JOB}) ({n.CHECKPOINT_LAST_SAVE}{{{JOB}}})",
                    legend,
                )
            ],
            width=12,
        )
    )
    d = d.with_panel(
        timeseries(
            "Checkpoint save time",
            "Time to write one checkpoint (95th percentile).",
            "s",
            [quantile(0.95, n.CHECKPOINT_SAVE_DURATION)],
        )
    )
    d = d.with_row(gd.Row("Operator"))
    d = d.with_panel(
        timeseries(
            "Reconciles by result",
            "Reconciles per second; result=error counts reconciles that raised and are retried.",
            "reqps",
            [
                Query(
                    f"sum by (result) (rate({n.total(n.OPERATOR_RECONCILE)}[{RATE}]))",
                    "{{result}}",
                )
            ],
        )
    )
    d = d.with_panel(
        timeseries(
            "Reconcile duration",
            "Time one reconcile takes: median and 99th percentile.",
            "s",
            [
                Query(
                    f"histogram_quantile({q}, sum by (le) "
                    f"(rate({n.bucket(n.OPERATOR_RECONCILE_DURATION)}[{RATE}])))",
                    f"p{round(q * 100)}",
                )
                for q in (0.5, 0.99)
            ],
        )
    )
    return d.build()


def render() -> str:
    return json.dumps(build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--write" in argv:
        OUTPUT.parent.mkdir(parents=True, exist_ok=True)
        OUTPUT.write_text(text, encoding="utf-8")
        print(f"wrote {OUTPUT}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
