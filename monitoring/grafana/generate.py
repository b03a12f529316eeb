"""rayrack's Grafana dashboards as code: `python -m monitoring.grafana.generate` writes dashboards/*.json.

The JSON is checked in (Grafana provisions it from files, and reviews see the diff); a test keeps it equal
to what this module generates. Every query goes through the `datasource` variable, and every dashboard
filters by `node` (and `gpu`) variables whose "All" value is a regex of every value.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DASHBOARDS_DIR = Path(__file__).resolve().parent / "dashboards"
SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# The datasource the grafana role provisions; dashboards default to it.
PROVISIONED_DATASOURCE_UID = "rayrack-prometheus"
TAGS = ["rayrack"]


def target(expr: str, legend: str = "", ref: str = "A", instant: bool = False) -> dict[str, Any]:
    return {
        "datasource": DATASOURCE,
        "expr": expr,
        "legendFormat": legend or "__auto",
        "refId": ref,
        "range": not instant,
        "instant": instant,
    }


def panel(
    kind: str,
    title: str,
    targets: Iterable[dict[str, Any]],
    unit: str = "short",
    description: str = "",
    width: int = 8,
    height: int = 8,
    **options: Any,
) -> dict[str, Any]:
    refs = [dict(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)]
    defaults: dict[str, Any] = {"unit": unit}
    if unit == "percentunit":
        defaults.update(min=0, max=1)
    result: dict[str, Any] = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": refs,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "gridPos": {"w": width, "h": height},
    }
    return result


def stat(title: str, expr: str, unit: str = "short", description: str = "", width: int = 4) -> dict[str, Any]:
    return panel("stat", title, [target(expr, instant=True)], unit, description, width=width, height=4,
                 reduceOptions={"calcs": ["lastNotNull"], "fields": "", "values": False}, colorMode="value")


def series(title: str, targets: Iterable[dict[str, Any]], unit: str = "short", description: str = "",
           width: int = 12) -> dict[str, Any]:
    return panel("timeseries", title, targets, unit, description, width=width,
                 legend={"displayMode": "list", "placement": "bottom", "showLegend": True},
                 tooltip={"mode": "multi", "sort": "desc"})


def table(title: str, expr: str, unit: str, description: str = "", width: int = 12) -> dict[str, Any]:
    result = panel("table", title, [target(expr, instant=True)], unit, description, width=width, height=10,
                   showHeader=True, sortBy=[{"displayName": "Value", "desc": True}])
    result["targets"][0]["format"] = "table"
    result["transformations"] = [{"id": "organize", "options": {"excludeByName": {"Time": True}}}]
    return result


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"w": 24, "h": 1}}


def variable(name: str, label: str, query: str, depends_on: str = "") -> dict[str, Any]:
    del depends_on  # documented in the query itself; Grafana refreshes chained variables on its own
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-values", "qryType": 1},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 3,
    }


DATASOURCE_VARIABLE = {
    "name": "datasource",
    "label": "Prometheus",
    "type": "datasource",
    "query": "prometheus",
    "current": {"selected": False, "text": "Prometheus", "value": PROVISIONED_DATASOURCE_UID},
    "hide": 0,
    "refresh": 1,
}


def layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Places panels left to right, wrapping at Grafana's 24 columns; a row starts a new line."""
    x = y = line_height = 0
    placed = []
    for number, item in enumerate(panels, start=1):
        grid = item["gridPos"]
        if item["type"] == "row" or x + grid["w"] > 24:
            x, y, line_height = 0, y + line_height, 0
        grid.update(x=x, y=y)
        x += grid["w"]
        line_height = max(line_height, grid["h"])
        placed.append(dict(item, id=number))
    return placed


def dashboard(uid: str, title: str, description: str, panels: list[dict[str, Any]],
              variables: Iterable[dict[str, Any]] = (), time_from: str = "now-6h") -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": TAGS,
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "time": {"from": time_from, "to": "now"},
        "templating": {"list": [DATASOURCE_VARIABLE, *variables]},
        "annotations": {"list": []},
        "links": [{"type": "dashboards", "tags": TAGS, "asDropdown": True, "title": "rayrack"}],
        "panels": layout(panels),
    }


NODE = variable("node", "Node", "label_values(rayrack_up, node)")
GPU_NODE = variable("node", "Node", "label_values(rayrack_gpu_up, node)")
GPU = variable("gpu", "GPU", 'label_values(rayrack_gpu_up{node=~"$node"}, gpu)')
# Users who held GPUs in the dashboard's range (job owners through the gateway, "unknown" for jobs around it,
# Linux users outside Ray).
USER = variable("user", "User", "label_values(rayrack_gpu_owner_share, user)")
# GPU-hours over the dashboard's range from the accounting rules (GPUs held at each evaluation): a 1-minute
# subquery makes it independent of the rules' evaluation interval.
GPU_HOURS = "sum_over_time({series}[$__range:1m]) / 60"


# Host series are node_exporter's, from its scrape job `node`, whose targets carry the agent's `node` label; the
# agent exports none.
NODE_EXPORTER = "node_exporter's series (job node)."
NOT_IDLE = 'mode!="idle"'
NOT_LOOPBACK = 'device!="lo"'
LOCAL_FILESYSTEMS = 'fstype!~"tmpfs|ramfs|overlay|squashfs"'


def host(metric: str, *matchers: str) -> str:
    return metric + "{" + ", ".join(['job="node"', *matchers]) + "}"


HOST_MEMORY_AVAILABLE = "node:node_memory_available:ratio"


def cluster_overview() -> dict[str, Any]:
    gpus = "cluster:rayrack_gpus:count"
    return dashboard(
        "rayrack-cluster",
        "rayrack / Cluster overview",
        "Every GPU of the cluster: busy, held idle, free, unknown or lost (each agent's rayrack_gpu_state); "
        "utilisation, memory and power; hosts and Ray.",
        [
            row("GPUs"),
            stat("GPUs busy", f'{gpus}{{state="busy"}}', width=3,
                 description="Held and computing at or above the agent's idle threshold, or under it for less than "
                             "its idle window."),
            stat("GPUs held idle", f'{gpus}{{state="idle_held"}}', width=3,
                 description="Held by a process but computing under the agent's idle threshold for its whole idle "
                             "window."),
            stat("GPUs free", f'{gpus}{{state="free"}}', width=3, description="No process holds them."),
            stat("GPUs unknown", f'{gpus}{{state="unknown"}}', width=3,
                 description="Not read this time, or their processes or activity could not be read (MIG)."),
            stat("GPUs lost", f'{gpus}{{state="lost"}}', width=3,
                 description="NVML says the GPU is lost: off the bus, or the driver dropped it."),
            stat("GPU utilisation", "cluster:rayrack_gpu_utilization:avg", "percentunit", width=5),
            stat("GPU power", "cluster:rayrack_gpu_power_watts:sum", "watt"),
            series("GPUs by state", [target(gpus, "{{state}}")]),
            series("GPU utilisation by node", [
                target("node:rayrack_gpu_utilization:avg", "{{node}}"),
                target("cluster:rayrack_gpu_utilization:avg", "cluster"),
            ], "percentunit"),
            series("GPU memory in use", [target("cluster:rayrack_gpu_memory_used:ratio", "cluster")],
                   "percentunit", width=8),
            series("GPU power by node", [target("sum by (node) (rayrack_gpu_power_watts)", "{{node}}")],
                   "watt", width=8),
            series("Hottest GPU by node", [target("max by (node) (rayrack_gpu_temperature_celsius)", "{{node}}")],
                   "celsius", width=8),
            row("Hosts and Ray"),
            stat("Agents up", 'sum(up{job="ray-agent"})', width=6),
            stat("Ray nodes alive", 'count(up{job="ray"} == 1)', width=6,
                 description="Nodes in Ray's own list whose metrics answer."),
            stat("Ray head", 'max(up{job="ray", ray_node_role="head"})', width=6,
                 description="1 when the head's Ray metrics answer."),
            stat("Host memory available (lowest)", f"min({HOST_MEMORY_AVAILABLE})", "percentunit", width=6,
                 description=NODE_EXPORTER),
            series("Host memory available", [target(HOST_MEMORY_AVAILABLE, "{{node}}")], "percentunit",
                   NODE_EXPORTER),
            series("Host CPU busy", [target(
                f'sum by (node) (rate({host("node_cpu_seconds_total", NOT_IDLE)}[$__rate_interval]))'
                f' / sum by (node) (rate({host("node_cpu_seconds_total")}[$__rate_interval]))', "{{node}}")],
                "percentunit", NODE_EXPORTER),
        ],
    )


def node_detail() -> dict[str, Any]:
    node = 'node=~"$node"'
    return dashboard(
        "rayrack-node",
        "rayrack / Node detail",
        "One node (or several): its host (node_exporter's memory, CPU, disk and network) and its GPUs.",
        [
            row("Host"),
            series("Memory", [
                target(host("node_memory_MemTotal_bytes", node), "{{node}} total"),
                target(host("node_memory_MemAvailable_bytes", node), "{{node}} available"),
            ], "bytes", NODE_EXPORTER, width=8),
            series("Swap used", [target(
                f'{host("node_memory_SwapTotal_bytes", node)} - {host("node_memory_SwapFree_bytes", node)}',
                "{{node}}")], "bytes", NODE_EXPORTER, width=8),
            series("CPU by mode", [target(
                f'sum by (node, mode) (rate({host("node_cpu_seconds_total", node)}[$__rate_interval]))',
                "{{node}} {{mode}}")], "s", "CPU-seconds per second, summed over the node's CPUs (node_exporter).",
                width=8),
            series("Load", [target(host("node_load1", node), "{{node}}")], description=NODE_EXPORTER, width=8),
            series("Filesystem space free", [target(
                host("node_filesystem_avail_bytes", node, LOCAL_FILESYSTEMS),
                "{{node}} {{mountpoint}}")], "bytes", NODE_EXPORTER, width=8),
            series("Network received", [target(
                f'sum by (node) (rate({host("node_network_receive_bytes_total", node, NOT_LOOPBACK)}'
                "[$__rate_interval]))", "{{node}}")], "Bps", NODE_EXPORTER, width=8),
            row("GPUs"),
            series("GPU utilisation", [target(f"rayrack_gpu_utilization_ratio{{{node}}}", "{{node}} GPU {{gpu}}")],
                   "percentunit"),
            series("GPU memory used", [target(f"rayrack_gpu_memory_used_bytes{{{node}}}", "{{node}} GPU {{gpu}}")],
                   "bytes"),
            series("GPU power", [target(f"rayrack_gpu_power_watts{{{node}}}", "{{node}} GPU {{gpu}}")],
                   "watt", width=8),
            series("GPU temperature", [target(f"rayrack_gpu_temperature_celsius{{{node}}}", "{{node}} GPU {{gpu}}")],
                   "celsius", width=8),
            series("GPU readable", [target(f"rayrack_gpu_up{{{node}}}", "{{node}} GPU {{gpu}}")],
                   description="1 when the agent read the GPU, 0 when it is lost.", width=8),
            row("Agent"),
            series("Collector success", [target(f"rayrack_collector_success{{{node}}}", "{{node}} {{collector}}")],
                   width=12),
            series("Collection duration", [target(
                f"rayrack_collector_duration_seconds{{{node}}}", "{{node}} {{collector}}")], "s", width=12),
        ],
        [NODE],
    )


def gpu_detail() -> dict[str, Any]:
    sel = 'node=~"$node", gpu=~"$gpu"'
    legend = "{{node}} GPU {{gpu}}"
    return dashboard(
        "rayrack-gpu",
        "rayrack / GPU detail",
        "Every field the agent reads from a GPU, its errors, and the processes holding it.",
        [
            series("Utilisation", [
                target(f"rayrack_gpu_utilization_ratio{{{sel}}}", f"{legend} SM"),
                target(f"rayrack_gpu_memory_utilization_ratio{{{sel}}}", f"{legend} memory"),
            ], "percentunit"),
            series("Activity (GPM)", [
                target(f"rayrack_gpu_sm_active_ratio{{{sel}}}", f"{legend} SM active"),
                target(f"rayrack_gpu_sm_occupancy_ratio{{{sel}}}", f"{legend} SM occupancy"),
                target(f"rayrack_gpu_tensor_active_ratio{{{sel}}}", f"{legend} tensor"),
                target(f"rayrack_gpu_dram_active_ratio{{{sel}}}", f"{legend} DRAM"),
            ], "percentunit",
                description="What the GPU really does (Hopper and later, mean since the previous collection); "
                "utilisation counts it 100 % busy while one tiny kernel runs. Empty for GPUs without GPM."),
            series("Memory", [
                target(f"rayrack_gpu_memory_used_bytes{{{sel}}}", f"{legend} used"),
                target(f"rayrack_gpu_memory_total_bytes{{{sel}}}", f"{legend} total"),
            ], "bytes"),
            series("Power", [target(f"rayrack_gpu_power_watts{{{sel}}}", legend)], "watt", width=8),
            series("Temperature", [target(f"rayrack_gpu_temperature_celsius{{{sel}}}", legend)], "celsius", width=8),
            series("Clocks", [
                target(f"rayrack_gpu_sm_clock_hertz{{{sel}}}", f"{legend} SM"),
                target(f"rayrack_gpu_memory_clock_hertz{{{sel}}}", f"{legend} memory"),
            ], "hertz", width=8),
            series("PCIe throughput", [target(
                f"rayrack_gpu_pcie_throughput_bytes_per_second{{{sel}}}", f"{legend} {{{{direction}}}}")], "Bps"),
            series("NVLink throughput", [target(
                f"rate(rayrack_gpu_nvlink_transferred_bytes_total{{{sel}}}[$__rate_interval])",
                f"{legend} {{{{direction}}}}")], "Bps"),
            series("XID errors", [target(f"rayrack_gpu_xid_errors_total{{{sel}}}", legend)],
                   description="XID errors since the agent started (each new one fires one alert, by its code's tier).",
                   width=8),
            series("ECC errors", [target(
                f"rayrack_gpu_ecc_errors_total{{{sel}}}", f"{legend} {{{{type}}}} {{{{scope}}}}")], width=8),
            series("Read errors", [target(
                f"sum by (node, gpu, error) (rayrack_gpu_read_errors_total{{{sel}}})"
                f" or sum by (node, gpu) (rayrack_gpu_up{{{sel}}} * 0)", f"{legend} {{{{error}}}}")],
                description="Collections in which the GPU could not be read (0 when it never failed).", width=8),
            table("Processes", f"rayrack_gpu_process_memory_used_bytes{{{sel}}}", "bytes",
                  "Processes holding the GPU, with their user and Ray job, actor and task.", width=24),
        ],
        [GPU_NODE, GPU],
    )


def idle_waste() -> dict[str, Any]:
    user = 'user=~"$user"'
    return dashboard(
        "rayrack-idle",
        "rayrack / Idle GPU waste",
        "GPUs held but idle (the agent's idle_held state), by user and Ray job: who is wasting GPUs, and for how "
        "long.",
        [
            stat("GPUs idle now", f"sum(user_job:rayrack_gpu_idle_seconds:rate5m{{{user}}})",
                 description="GPU-seconds idle per second over 5 minutes: the number of GPUs held idle.", width=6),
            stat("Idle GPU-hours, last day", f"sum(user_job:rayrack_gpu_idle_hours:increase1d{{{user}}})",
                 "h", width=6),
            stat("Guard dry run", "min(rayrack_guard_dry_run)", width=6,
                 description="1: the guard only reports what it would do on at least one node."),
            stat("Guard actions, last day", "sum(increase(rayrack_guard_actions_total[1d]))", width=6),
            table("Idle GPU-hours by user and Ray job, last day",
                  f"sort_desc(user_job:rayrack_gpu_idle_hours:increase1d{{{user}}})", "h"),
            series("GPUs idle by user and Ray job", [target(
                f"user_job:rayrack_gpu_idle_seconds:rate5m{{{user}}}", "{{user}} {{ray_job_id}}")]),
            series("GPUs by state", [target("cluster:rayrack_gpus:count", "{{state}}")]),
            series("Longest idle run by node", [target(
                "max by (node) (rayrack_gpu_idle_run_seconds)", "{{node}}")], "s"),
            table("GPU memory held by user and Ray job",
                  f"sum by (user, ray_job_id) (rayrack_gpu_process_memory_used_bytes{{{user}}})", "bytes"),
            table("Idle share of held GPU-hours by user, dashboard range",
                  f"{GPU_HOURS.format(series=f'user:rayrack_gpus_idle_held:sum{{{user}}}')}"
                  f" / {GPU_HOURS.format(series=f'user:rayrack_gpus_allocated:sum{{{user}}}')}", "percentunit",
                  "GPU-hours held idle (the agent's idle_held) over all GPU-hours held."),
            series("GPUs idle-held by user", [target(f"user:rayrack_gpus_idle_held:sum{{{user}}}", "{{user}}")],
                   description="GPUs in the idle_held state, shared among their owners."),
            table("Guard actions by stage and outcome, last day",
                  "sum by (stage, action, outcome) (increase(rayrack_guard_actions_total[1d]))", "short"),
        ],
        [USER],
        time_from="now-24h",
    )


def my_jobs() -> dict[str, Any]:
    user = 'user=~"$user"'
    held = f"rayrack_gpu_owner_share{{{user}}}"
    return dashboard(
        "rayrack-my-jobs",
        "rayrack / My jobs",
        "The GPUs of $user's Ray jobs: what they hold, how busy those GPUs are, what sits idle, and GPU-hours used.",
        [
            stat("GPUs held now", f"sum(user:rayrack_gpus_allocated:sum{{{user}}})", width=6,
                 description="GPUs held by the user's processes; a GPU shared by n owners counts 1/n."),
            stat("GPUs idle-held now", f"sum(user:rayrack_gpus_idle_held:sum{{{user}}})", width=6,
                 description="Of those, held but idle for the agent's whole idle window."),
            stat("GPU-hours, dashboard range",
                 f"sum({GPU_HOURS.format(series=f'user:rayrack_gpus_allocated:sum{{{user}}}')})", "h", width=6),
            stat("Idle GPU-hours, dashboard range",
                 f"sum({GPU_HOURS.format(series=f'user:rayrack_gpus_idle_held:sum{{{user}}}')})", "h", width=6),
            table("Jobs holding GPUs, dashboard range",
                  f"group by (ray_job_id, submission_id, user) (last_over_time(job:rayrack_job_info:group{{{user}}}"
                  "[$__range]))", "short", "The Ray jobs with their submission ids.", width=12),
            table("GPU-hours by Ray job, dashboard range",
                  "sum by (user, ray_job_id) ("
                  f"{GPU_HOURS.format(series=f'user_job:rayrack_gpus_allocated:sum{{{user}}}')})", "h", width=12),
            series("Utilisation of the GPUs held", [target(
                f"rayrack_gpu_utilization_ratio and on (instance, gpu) {held}", "{{node}} GPU {{gpu}}")],
                "percentunit"),
            series("GPU memory used by the user's processes", [target(
                f"sum by (node, gpu, ray_job_id) (rayrack_gpu_process_memory_used_bytes{{{user}}})",
                "{{node}} GPU {{gpu}} {{ray_job_id}}")], "bytes"),
            series("GPUs held by Ray job", [target(
                f"user_job:rayrack_gpus_allocated:sum{{{user}}}", "{{user}} {{ray_job_id}}")]),
            series("GPUs idle-held by Ray job", [target(
                f"user_job:rayrack_gpus_idle_held:sum{{{user}}}", "{{user}} {{ray_job_id}}")],
                description="Held but idle for the agent's whole idle window."),
        ],
        [USER],
        time_from="now-24h",
    )


DASHBOARDS = {
    "cluster-overview.json": cluster_overview,
    "node-detail.json": node_detail,
    "gpu-detail.json": gpu_detail,
    "idle-waste.json": idle_waste,
    "my-jobs.json": my_jobs,
}


def render(build) -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monitoring.grafana.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a checked-in dashboard differs")
    parser.add_argument("--out", type=Path, default=DASHBOARDS_DIR, help="output directory")
    args = parser.parse_args(argv)
    stale = []
    args.out.mkdir(parents=True, exist_ok=True)
    for name, build in DASHBOARDS.items():
        path = args.out / name
        text = render(build)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)}; run python -m monitoring.grafana.generate", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
