"""A dashboard's panel queries as Grafana sends them to Prometheus: its template variables answered from
Prometheus (`label_values`, `query_result`, with the variable's regex) and put into each target's expression.

Prometheus is reached through `ask`, a callable taking a list of (API path, params) requests and returning
their decoded JSON answers, so the same code runs against a lab's Prometheus or any other.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

Ask = Callable[[list[tuple[str, dict]]], list[dict]]

# What Grafana puts in for its own variables at a dashboard's default range and a 5 s..15 s scrape interval.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
_LABEL_VALUES = re.compile(r"label_values\(\s*(?:(.+?)\s*,\s*)?(\w+)\s*\)", re.DOTALL)
_QUERY_RESULT = re.compile(r"query_result\((.+)\)", re.DOTALL)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_METRIC = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{")
_REGEX_SPECIALS = re.compile(r"[$^*{}\[\]'+?.()|]")


class DashboardError(ValueError):
    """A dashboard this module cannot read: names the dashboard, the variable or panel, and what is allowed."""


@dataclass(frozen=True, slots=True)
class Target:
    where: str  # "dashboard / panel (refId)"
    expr: str  # as written in the dashboard, variables unsubstituted


@dataclass(frozen=True, slots=True)
class Variable:
    name: str
    options: tuple[str, ...]
    value: str  # what Grafana puts into an expression for the variable's default selection


def substitute(expr: str, values: dict[str, str]) -> str:
    """`$name`, `${name}`, `${name:format}` and `[[name]]` replaced; unknown names are left as written."""

    def value(match: re.Match) -> str:
        name = match[1] or match[2] or match[3]
        return values.get(name, match[0])

    return _VARIABLE.sub(value, expr)


def referenced(expr: str) -> set[str]:
    """The names of the variables an expression uses."""
    return {m[1] or m[2] or m[3] for m in _VARIABLE.finditer(expr)}


def regex_value(options: tuple[str, ...] | list[str]) -> str:
    """Several values as Grafana's Prometheus data source writes them into a `=~` matcher: each escaped for a
    regex inside a PromQL string, joined into one group."""
    escaped = [_REGEX_SPECIALS.sub(lambda m: "\\\\" + m[0], option.replace("\\", "\\\\\\\\")) for option in options]
    return "(" + "|".join(escaped) + ")"


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (those written with a `{...}` selector)."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def targets(board: dict) -> list[Target]:
    """Every PromQL target of every panel, rows (old `rows` and collapsed `row` panels) included; targets
    without an expression (Grafana's server-side expressions) and hidden ones are left out."""
    title = board.get("title", "?")
    panels = list(_panels(board.get("panels", [])))
    for row in board.get("rows", []):
        panels += list(_panels(row.get("panels", [])))
    found = []
    for panel in panels:
        for target in panel.get("targets", []):
            if target.get("expr") and not target.get("hide"):
                found.append(Target(f"{title} / {panel.get('title', '?')} ({target.get('refId', '?')})",
                                    target["expr"]))
    return found


def _query_of(variable: dict) -> str:
    query = variable.get("query")
    if isinstance(query, dict):
        query = query.get("query")
    if not isinstance(query, str) or not query.strip():
        query = variable.get("definition") or ""
    return query


def _result_line(sample: dict) -> str:
    """One `query_result` row the way Grafana shows it: `name{label="value", ...} value timestamp`."""
    metric = dict(sample["metric"])
    name = metric.pop("__name__", "")
    labels = ", ".join(f'{key}="{value}"' for key, value in metric.items())
    timestamp, value = sample["value"]
    return f"{name}{{{labels}}} {value} {int(float(timestamp) * 1000)}"


def _apply_regex(board: str, variable: dict, texts: list[str]) -> tuple[str, ...]:
    pattern = variable.get("regex") or ""
    if not pattern:
        return tuple(dict.fromkeys(texts))
    match = re.fullmatch(r"/(.*)/([gimsuy]*)", pattern, re.DOTALL)
    if match is None:
        raise DashboardError(f"{board}: variable ${variable['name']} has regex {pattern!r}; expected /pattern/flags")
    flags = re.IGNORECASE if "i" in match[2] else 0
    compiled = re.compile(match[1], flags)
    kept = []
    for text in texts:
        found = compiled.search(text)
        if found:
            kept.append(found[1] if compiled.groups else text)
    return tuple(dict.fromkeys(kept))


def _request(board: str, variable: dict, query: str) -> tuple[tuple[str, dict], Callable[[dict], list[str]]]:
    label_values = _LABEL_VALUES.fullmatch(query.strip())
    if label_values:
        selector, label = label_values[1], label_values[2]
        params = {"match[]": selector} if selector else {}

        def labels(answer: dict) -> list[str]:
            return sorted(answer.get("data") or [])

        return (f"/api/v1/label/{label}/values", params), labels
    query_result = _QUERY_RESULT.fullmatch(query.strip())
    if query_result:

        def lines(answer: dict) -> list[str]:
            data = answer.get("data") or {}
            return [_result_line(sample) for sample in data.get("result", [])]

        return ("/api/v1/query", {"query": query_result[1]}), lines
    raise DashboardError(f"{board}: variable ${variable['name']} has query {query!r}; expected label_values(...) "
                         "or query_result(...)")


def variables(board: dict, ask: Ask, queries: dict[str, str] | None = None
              ) -> tuple[dict[str, Variable], dict[str, str]]:
    """Each query variable of the dashboard, in order (later ones may use earlier ones), with its options from
    Prometheus and the value Grafana uses at load time: All (its allValue, or every option) where the variable
    offers All, else the first option. `queries` replaces a variable's query by name. Also returns, by name,
    what went wrong with the variables Prometheus gave no option."""
    title = board.get("title", "?")
    values = dict(GRAFANA_BUILTINS)
    resolved: dict[str, Variable] = {}
    problems: dict[str, str] = {}
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        name = variable["name"]
        query = substitute((queries or {}).get(name) or _query_of(variable), values)
        request, read = _request(title, variable, query)
        (answer,) = ask([request])
        if answer.get("status") != "success":
            problems[name] = f"{title}: variable ${name}: error {answer.get('error')}: {query}"
        options = _apply_regex(title, variable, read(answer))
        if not options:
            problems.setdefault(name, f"{title}: variable ${name} has no values ({query})")
        if variable.get("includeAll"):
            value = variable.get("allValue") or regex_value(options)
        else:
            value = options[0] if options else ""
        resolved[name] = Variable(name, options, value)
        values[name] = value
    return resolved, problems


def values_of(resolved: dict[str, Variable], **chosen: str) -> dict[str, str]:
    """The substitution table: Grafana's builtins, each variable's value, and any chosen option instead."""
    return {**GRAFANA_BUILTINS, **{name: v.value for name, v in resolved.items()}, **chosen}


def answered(ask: Ask, queries: list[tuple[str, str]]) -> list[str]:
    """The (where, expression) queries that fail or return no series, each as a line naming both."""
    answers = ask([("/api/v1/query", {"query": expr}) for _, expr in queries])
    problems = []
    for (where, expr), answer in zip(queries, answers, strict=True):
        if answer.get("status") != "success":
            problems.append(f"{where}: error {answer.get('error')}: {expr}")
        elif not answer["data"]["result"]:
            problems.append(f"{where}: no data: {expr}")
    return problems
