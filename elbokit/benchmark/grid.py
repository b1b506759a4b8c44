"""A benchmark grid: axes of term lists, priors, datasets, seeds (and named variants), one
ordinary run directory per cell, resumable and extensible, aggregated over seeds.

Layout of a grid directory (docs/grids.md):

    GRID/
      grid.json                the shared settings and the cells, in order (extending adds cells)
      cells/NAME.json          a cell's labels and fully resolved training config
      cells/NAME.result.json   its outcome (status ok/failed/diverged, metrics, cost); written once
      cells/NAME.lock          held by the process running the cell (fcntl lock, released by the OS)
      cells/NAME.log           that process's stderr
      runs/NAME/               the run directory (`elbokit evaluate/plot/train --resume` work on it)
      results.csv              one row per cell
      summary.csv summary.json summary.md   mean, standard deviation and count over seeds
      figures/metrics.png figures/speed_vs_iwae.png

A cell is finished when its result file exists; a cell with a run directory and no result is
resumed from its checkpoint; anything else is run. So invoking the same grid again redoes
nothing, and an interrupted grid continues where it stopped.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import config as config_mod
from .. import metrics as metric_names
from ..errors import ElbokitError

GRID_FORMAT = 1

# The result columns. Metric names, what they are and their units come from the one table of
# metric names, elbokit.metrics; the grid only chooses which and adds its own cost columns.
RESULT_METRIC_NAMES = ["elbo", "iwae", "exact_loglik", "recon", "kl", "mi", "marginal_kl", "aggregate_entropy",
                       "aggregate_cross_entropy", "mse", "active_units", "latent_r2", "paper_mse", "paper_kld",
                       "paper_elbo"]
METRICS: list[tuple[str, str, str]] = [
    (name, name, f"{metric_names.metric(name).description} ({metric_names.metric(name).units}; "
                 f"{metric_names.metric(name).kind}" + (f", {metric_names.metric(name).better} is better)"
                                                        if metric_names.metric(name).better else ")"))
    for name in RESULT_METRIC_NAMES
]
COST: list[tuple[str, str]] = [
    ("epochs", metric_names.metric("epochs").description + " (early stopping ends most runs before max_epochs)"),
    ("train_seconds", "training wall time of the run, seconds (summed over resumptions)"),
    ("steps_per_second", "optimiser steps per second over the whole run: steps / train_seconds"),
    ("eval_seconds", "held-out evaluation time, seconds"),
    ("peak_rss_mb", "peak resident memory of the cell's last process, MB"),
]
AXES = ("variant", "data", "terms", "prior", "seed")
LABEL_COLUMNS = ["cell", "configuration", "variant", "data", "terms", "prior", "seed"]
RESULT_COLUMNS = [*LABEL_COLUMNS, "status", "error", *[m for m, _, _ in METRICS], *[c for c, _ in COST],
                  "threads", "run_dir"]
SUMMARY_KEYS = [m for m, _, _ in METRICS] + [c for c, _ in COST]
FINISHED = ("ok", "failed", "diverged")


# -- the grid specification ------------------------------------------------------------
@dataclass
class AxisEntry:
    """One value of an axis: a label (None: derived from the resolved config) and the partial
    config it sets."""

    label: str | None
    overrides: dict[str, Any]


@dataclass
class GridSpec:
    """`fixed`: a partial training config held for every cell; `axes`: the entries of each axis
    (an absent axis is one entry that sets nothing)."""

    fixed: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, list[AxisEntry]] = field(default_factory=dict)
    preset: str | None = None
    title: str | None = None


@dataclass
class Cell:
    name: str
    configuration: str
    labels: dict[str, Any]
    config: dict[str, Any]


def parse_seeds(text: Any, where: str = "--seeds") -> list[int]:
    """`0-4`, `0,2,5`, `3` or a list of integers -> a sorted list without repeats."""
    if isinstance(text, bool):
        raise ElbokitError(f"{where} must be seeds such as 0-4 or 0,2,5, got {text!r}.")
    if isinstance(text, int):
        return [text]
    if isinstance(text, (list, tuple)):
        items = list(text)
    else:
        items = [part.strip() for part in str(text).split(",") if part.strip()]
    seeds: list[int] = []
    for item in items:
        if isinstance(item, bool):
            raise ElbokitError(f"{where} must be seeds such as 0-4 or 0,2,5, got {text!r}.")
        if isinstance(item, int):
            seeds.append(item)
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)|(-?\d+)", str(item).strip())
        if not m:
            raise ElbokitError(f"{where} must be seeds such as 0-4 or 0,2,5, got {text!r}.")
        if m.group(3) is not None:
            seeds.append(int(m.group(3)))
        else:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise ElbokitError(f"{where}: the range {item} is empty (write it low-high, e.g. 0-4).")
            seeds.extend(range(lo, hi + 1))
    if not seeds:
        raise ElbokitError(f"{where} is empty: give seeds such as 0-4 or 0,2,5.")
    return sorted(set(seeds))


_AXIS_KEY = {"data": ("data", "dataset"), "terms": ("objective", "terms"), "prior": ("prior", "name"),
             "seed": ("train", "seed")}


def axis_entry(axis: str, value: Any, source: str) -> AxisEntry:
    """A plain value (`"gmm"`, `"recon,kl:0.5"`, `3`) or a table `{label = "...", <sections>}`."""
    if isinstance(value, dict):
        value = dict(value)
        label = value.pop("label", None)
        if label is None or not isinstance(label, str) or not label.strip():
            raise ElbokitError(f"An entry of {axis} in {source} is a table and needs a label = \"...\" (got {value!r}).")
        _check_partial(value, f"{axis} entry '{label}' in {source}")
        return AxisEntry(label.strip(), value)
    if axis == "variant":
        raise ElbokitError(f"Each [[variant]] in {source} must be a table with a label and config sections.")
    if axis == "seed":
        seed = parse_seeds(value, f"seeds in {source}")
        return AxisEntry(None, {"train": {"seed": seed[0]}})
    if not isinstance(value, str) or not value.strip():
        raise ElbokitError(f"{axis} values in {source} must be names (strings) or labelled tables, got {value!r}.")
    section, key = _AXIS_KEY[axis]
    return AxisEntry(None, {section: {key: value.strip()}})


def _check_partial(partial: dict[str, Any], where: str) -> None:
    """Refuse unknown sections/keys now, naming where they came from."""
    config_mod.merge(config_mod.defaults(), partial, where)


def spec_from_dict(raw: dict[str, Any], source: str) -> GridSpec:
    """A grid file's (or preset's) table -> GridSpec. Keys: `seeds`, `terms`, `prior`, `data`,
    `[fixed.<section>]`, `[[variant]]`, `title`."""
    known = {"seeds", "terms", "prior", "data", "fixed", "variant", "title"}
    unknown = [k for k in raw if k not in known]
    if unknown:
        raise ElbokitError(f"Unknown key '{unknown[0]}' in {source}; a grid file has: {', '.join(sorted(known))}.")
    spec = GridSpec(title=raw.get("title"))
    fixed = raw.get("fixed", {})
    if not isinstance(fixed, dict):
        raise ElbokitError(f"[fixed] in {source} must be a table of config sections, e.g. [fixed.train] max_epochs = 50.")
    _check_partial(fixed, f"[fixed] of {source}")
    spec.fixed = copy.deepcopy(fixed)
    for axis, key in (("terms", "terms"), ("prior", "prior"), ("data", "data"), ("variant", "variant")):
        if key in raw:
            values = raw[key] if isinstance(raw[key], list) else [raw[key]]
            if not values:
                raise ElbokitError(f"{key} in {source} is an empty list.")
            spec.axes[axis] = [axis_entry(axis, v, source) for v in values]
    if "seeds" in raw:
        spec.axes["seed"] = [AxisEntry(None, {"train": {"seed": s}}) for s in parse_seeds(raw["seeds"], f"seeds in {source}")]
    return spec


def load_grid_file(path: str | Path) -> GridSpec:
    return spec_from_dict(config_mod.load_toml(path), str(path))


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def slug(text: str) -> str:
    """A file-name-safe label: `recon,kl:0.5` -> `recon+kl0.5`, a path -> its stem."""
    if "/" in text or text.endswith((".npz", ".npy", ".csv")):
        text = Path(text).stem
    text = text.replace(",", "+").replace(":", "")
    return re.sub(r"[^A-Za-z0-9_.+=-]", "_", text) or "_"


def _absolute_paths(partial: dict[str, Any]) -> dict[str, Any]:
    """Data and prior-sample files as absolute paths, so that a cell runs the same from any
    working directory (and on other machines sharing the filesystem)."""
    out = copy.deepcopy(partial)
    data = out.get("data", {})
    if isinstance(data.get("dataset"), str) and Path(data["dataset"]).exists():
        data["dataset"] = str(Path(data["dataset"]).resolve())
    prior = out.get("prior", {})
    if isinstance(prior.get("samples"), str) and Path(prior["samples"]).exists():
        prior["samples"] = str(Path(prior["samples"]).resolve())
    return out


# A grid's own defaults, under the file's and the command line's settings: one torch thread per
# cell, so that a cell's numbers do not depend on --jobs, the executor or the machine's cores.
GRID_DEFAULTS: dict[str, Any] = {"train": {"threads": 1}}


def _fixed(spec: GridSpec) -> dict[str, Any]:
    return deep_merge(GRID_DEFAULTS, spec.fixed)


def resolve_cells(spec: GridSpec, grid_dir: str | Path) -> list[Cell]:
    """Every cell of the grid, with its fully resolved config (run directory GRID/runs/NAME).
    A bad key or value is one line naming the cell."""
    grid_dir = Path(grid_dir).resolve()
    axes = [spec.axes.get(a) or [AxisEntry(None, {})] for a in AXES]
    cells: dict[str, Cell] = {}
    for combo in itertools.product(*axes):
        partial = _fixed(spec)
        for entry in (*combo[1:], combo[0]):  # a variant, the most specific, is applied last
            partial = deep_merge(partial, entry.overrides)
        partial = _absolute_paths(partial)
        labels_given = dict(zip(AXES, (e.label for e in combo)))
        where = "the grid cell " + ", ".join(f"{a}={e.label or _describe(e)}" for a, e in zip(AXES, combo) if e.overrides or e.label)
        cfg = config_mod.resolve(partial, source=where or "the grid")
        labels = {
            "variant": labels_given["variant"] or "",
            "data": labels_given["data"] or slug(cfg["data"]["dataset"]),
            "terms": labels_given["terms"] or slug(cfg["objective"]["terms"]),
            "prior": labels_given["prior"] or slug(cfg["prior"]["name"]),
            "seed": cfg["train"]["seed"],
        }
        configuration = "-".join(str(labels[a]) for a in ("variant", "data", "terms", "prior") if labels[a] != "")
        name = f"{configuration}-s{labels['seed']}"
        cfg["output"]["out"] = str(grid_dir / "runs" / name)
        if name in cells:
            if _flat(cells[name].config) != _flat(cfg):
                raise ElbokitError(f"Two cells of the grid are both named '{name}' but differ; give the entries distinct labels.")
            continue
        cells[name] = Cell(name, configuration, labels, cfg)
    return list(cells.values())


def _describe(entry: AxisEntry) -> str:
    flat = _flat(entry.overrides)
    return ",".join(f"{k}={v}" for k, v in flat.items())


def _flat(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def check_names(cells: list[Cell]) -> None:
    """Refuse, before anything runs, a term, prior or dataset that no plugin registered."""
    from ..objective import parse_terms
    from ..plugins import get_registry

    registry = get_registry()
    seen: set[tuple[str, str]] = set()
    for cell in cells:
        cfg = cell.config
        for kind, name in [("term", n) for n, _ in parse_terms(cfg["objective"]["terms"])] + [("prior", cfg["prior"]["name"])]:
            if (kind, name) not in seen:
                seen.add((kind, name))
                (registry.term if kind == "term" else registry.prior)(name)
        dataset = cfg["data"]["dataset"]
        if ("data", dataset) not in seen:
            seen.add(("data", dataset))
            if dataset not in registry.datasets and not Path(dataset).exists():
                registry.dataset(dataset)  # the standard unknown-name line


# -- the grid directory ----------------------------------------------------------------
def _shared_settings(spec: GridSpec) -> dict[str, Any]:
    """The resolved value of every setting no axis sets: what every cell of the grid shares."""
    axis_keys = {k for entries in spec.axes.values() for e in entries for k in _flat(e.overrides)}
    resolved = _flat(config_mod.resolve(_absolute_paths(_fixed(spec)), source="the grid's fixed settings"))
    return {k: v for k, v in resolved.items() if k not in axis_keys and k != "output.out"}


class GridDir:
    """The files of one grid (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()

    # paths
    def cell_file(self, name: str) -> Path:
        return self.path / "cells" / f"{name}.json"

    def result_file(self, name: str) -> Path:
        return self.path / "cells" / f"{name}.result.json"

    def lock_file(self, name: str) -> Path:
        return self.path / "cells" / f"{name}.lock"

    def log_file(self, name: str) -> Path:
        return self.path / "cells" / f"{name}.log"

    def run_dir(self, name: str) -> Path:
        return self.path / "runs" / name

    # state
    def read_index(self) -> dict[str, Any] | None:
        path = self.path / "grid.json"
        if not path.is_file():
            # A driver killed while planning leaves cells/ without grid.json: that is a new grid.
            if self.path.exists() and (not self.path.is_dir() or any(p.name != "cells" for p in self.path.iterdir())):
                raise ElbokitError(f"{self.path} exists and is not a grid directory (no grid.json); choose another --out.")
            return None
        try:
            index = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ElbokitError(f"{path} is damaged ({exc}); it cannot be extended or resumed.") from None
        if not isinstance(index, dict) or index.get("format") != GRID_FORMAT:
            raise ElbokitError(f"{path} is not a grid index of format {GRID_FORMAT}.")
        return index

    def cell_names(self) -> list[str]:
        index = self.read_index()
        return list(index["cells"]) if index else []

    def status(self, name: str) -> str:
        """ok / failed / diverged (finished), partial (a run directory to resume) or new."""
        result = self.read_result(name)
        if result is not None:
            return result["status"]
        return "partial" if self.run_dir(name).is_dir() else "new"

    def read_result(self, name: str) -> dict[str, Any] | None:
        path = self.result_file(name)
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    def read_cell(self, name: str) -> dict[str, Any]:
        return json.loads(self.cell_file(name).read_text())

    def plan(self, spec: GridSpec, cells: list[Cell]) -> dict[str, Any]:
        """Check the cells against what the directory already holds (a changed shared setting
        or a changed cell is refused, naming it) and return the new index. Writes nothing."""
        from ..io import check_can_create

        shared = _shared_settings(spec)
        index = self.read_index()
        if index is None:
            check_can_create(self.path, "the grid directory", "give --out a path in a writable directory")
            index = {"format": GRID_FORMAT, "preset": spec.preset, "title": spec.title, "shared": shared, "cells": []}
        old = index["shared"]
        for key in sorted(set(old) | set(shared)):
            if key in old and key in shared and old[key] != shared[key]:
                raise ElbokitError(
                    f"{key} is {old[key]!r} in the existing grid {self.path} but {shared[key]!r} here: a setting shared "
                    "by its cells cannot change (keep it, or give another --out).")
        for cell in cells:
            if self.cell_file(cell.name).is_file():
                before = _flat(self.read_cell(cell.name)["config"])
                now = _flat(cell.config)
                for key in sorted(set(before) | set(now)):
                    if before.get(key) != now.get(key):
                        raise ElbokitError(
                            f"Cell {cell.name} of {self.path} has {key} = {before.get(key)!r} but the grid now gives "
                            f"{now.get(key)!r}: a finished or started cell cannot change (relabel it, or give another --out).")
        names = list(index["cells"]) + [c.name for c in cells if c.name not in index["cells"]]
        return {**index, "cells": names}

    def write_plan(self, index: dict[str, Any], cells: list[Cell]) -> None:
        from ..io import write_json

        (self.path / "cells").mkdir(parents=True, exist_ok=True)
        for cell in cells:
            if not self.cell_file(cell.name).is_file():
                write_json(self.cell_file(cell.name), {"name": cell.name, "configuration": cell.configuration,
                                                       "labels": cell.labels, "config": cell.config})
        write_json(self.path / "grid.json", index)

    # results
    def rows(self) -> list[dict[str, Any]]:
        """One row per cell of the index, in order (RESULT_COLUMNS); unfinished cells have the
        status partial or new and no metrics."""
        rows = []
        for name in self.cell_names():
            cell = self.read_cell(name)
            labels = cell["labels"]
            row: dict[str, Any] = {c: None for c in RESULT_COLUMNS}
            row.update(cell=name, configuration=cell["configuration"], variant=labels["variant"], data=labels["data"],
                       terms=labels["terms"], prior=labels["prior"], seed=labels["seed"],
                       threads=cell["config"]["train"]["threads"], run_dir=str(Path("runs") / name))
            result = self.read_result(name)
            if result is None:
                row["status"] = self.status(name)
            else:
                row["status"], row["error"] = result["status"], result.get("error")
                for column, key, _ in METRICS:
                    row[column] = result.get("metrics", {}).get(key)
                for column, _ in COST:
                    row[column] = result.get("cost", {}).get(column)
            rows.append(row)
        return rows


# -- aggregation -----------------------------------------------------------------------
def _number(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per configuration (every label but the seed): for each metric the mean, the standard
    deviation over seeds (n - 1 in the denominator; None for one value) and the count of cells
    that have it; finished cells that failed or diverged are counted and their errors kept."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["configuration"], []).append(row)
    out = []
    for configuration, members in groups.items():
        first = members[0]
        ok = [r for r in members if r["status"] == "ok"]
        entry: dict[str, Any] = {
            "configuration": configuration, "variant": first["variant"], "data": first["data"],
            "terms": first["terms"], "prior": first["prior"], "cells": len(members), "ok": len(ok),
            "failed": sum(r["status"] in ("failed", "diverged") for r in members),
            "unfinished": sum(r["status"] not in FINISHED for r in members),
            "seeds": [r["seed"] for r in ok],
            "errors": {r["cell"]: f"{r['status']}: {r['error']}" for r in members if r["status"] in ("failed", "diverged")},
            "metrics": {},
        }
        for key in SUMMARY_KEYS:
            values = [v for v in (_number(r[key]) for r in ok) if v is not None]
            entry["metrics"][key] = {
                "mean": statistics.fmean(values) if values else None,
                "std": statistics.stdev(values) if len(values) > 1 else None,
                "count": len(values),
            }
        out.append(entry)
    return out


def summary_columns() -> list[str]:
    cols = ["configuration", "variant", "data", "terms", "prior", "cells", "ok", "failed", "unfinished"]
    for key in SUMMARY_KEYS:
        cols += [f"{key}_mean", f"{key}_std", f"{key}_count"]
    return cols


def summary_rows(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for g in groups:
        row = {k: g[k] for k in ("configuration", "variant", "data", "terms", "prior", "cells", "ok", "failed", "unfinished")}
        for key, stats in g["metrics"].items():
            row.update({f"{key}_mean": stats["mean"], f"{key}_std": stats["std"], f"{key}_count": stats["count"]})
        rows.append(row)
    return rows


def csv_text(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else (repr(row[k]) if isinstance(row[k], float) else row[k]))
                         for k in columns})
    return buf.getvalue()


def mean_sd(stats: dict[str, Any], digits: int = 2) -> str:
    if stats["mean"] is None:
        return "-"
    text = f"{stats['mean']:.{digits}f}"
    if stats["std"] is not None:
        text += f" ± {stats['std']:.{digits}f}"
    return text


MARKDOWN_METRICS = ["elbo", "iwae", "exact_loglik", "recon", "kl", "mi", "marginal_kl", "active_units", "latent_r2"]
MARKDOWN_PAPER = ["paper_mse", "paper_kld", "paper_elbo"]
MARKDOWN_COST = ["epochs", "train_seconds", "steps_per_second", "peak_rss_mb"]


def markdown(groups: list[dict[str, Any]], header: str = "", extra: str = "") -> str:
    """summary.md: the held-out metrics, the paper's metrics, the cost; mean ± sd over seeds."""
    def table(keys: list[str]) -> list[str]:
        lines = ["| configuration | n | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
        for g in groups:
            n = f"{g['ok']}" + (f" (+{g['failed']} failed)" if g["failed"] else "") + (f" (+{g['unfinished']} unfinished)" if g["unfinished"] else "")
            lines.append(f"| {g['configuration']} | {n} | " + " | ".join(mean_sd(g["metrics"][k]) for k in keys) + " |")
        return lines

    lines = [header.rstrip(), ""] if header else []
    lines += ["Held-out test split, against each model's own prior; nats per example, log-likelihoods in the",
              "original data units; mean ± standard deviation over seeds (n: cells that finished).", ""]
    lines += table(MARKDOWN_METRICS)
    lines += ["", "The paper's metrics for the same runs (not bounds; they do not rank models):", ""]
    lines += table(MARKDOWN_PAPER)
    lines += ["", "Cost per cell (one process per cell):", ""]
    lines += table(MARKDOWN_COST)
    errors = [(cell, err) for g in groups for cell, err in g["errors"].items()]
    if errors:
        lines += ["", "Cells that failed or diverged (each is a row of results.csv):", ""]
        lines += [f"- {cell}: {err}" for cell, err in errors]
    if extra:
        lines += ["", extra.rstrip()]
    return "\n".join(lines) + "\n"


def write_outputs(grid: GridDir, *, header: str = "", extra_markdown: Any = None, figures: bool = True) -> dict[str, Any]:
    """results.csv, summary.csv, summary.json, summary.md and the figures; returns summary.json's content."""
    from ..io import write_json, write_text

    rows = grid.rows()
    groups = aggregate(rows)
    write_text(grid.path / "results.csv", csv_text(rows, RESULT_COLUMNS))
    write_text(grid.path / "summary.csv", csv_text(summary_rows(groups), summary_columns()))
    summary = {
        "grid": str(grid.path), "cells": len(rows), "ok": sum(r["status"] == "ok" for r in rows),
        "failed": sum(r["status"] in ("failed", "diverged") for r in rows),
        "unfinished": sum(r["status"] not in FINISHED for r in rows),
        "columns": {**{m: d for m, _, d in METRICS}, **dict(COST)},
        "configurations": groups,
    }
    write_json(grid.path / "summary.json", summary)
    extra = extra_markdown(groups) if extra_markdown else ""
    write_text(grid.path / "summary.md", markdown(groups, header, extra))
    if figures and summary["ok"]:
        from .figures import write_figures

        write_figures(groups, grid.path / "figures")
    return summary


# -- running ---------------------------------------------------------------------------
class SilentProgress:
    def start(self, total: int, done: int) -> None: pass
    def cell_done(self, name: str, status: str, seconds: float | None) -> None: pass
    def stop(self) -> None: pass


def run_grid(spec: GridSpec, out: str | Path, executor: Any, *, retry_failed: bool = False,
             progress: Any = None, header: str = "", extra_markdown: Any = None) -> dict[str, Any]:
    """Plan the grid in `out` (refusing a changed shared setting), run every cell that has no
    result (resuming partial ones), record each result as it lands, and write the outputs.
    Returns summary.json's content, with `ran` (the cells run by this call)."""
    from ..io import write_json

    progress = progress or SilentProgress()
    grid = GridDir(out)
    cells = resolve_cells(spec, grid.path)
    check_names(cells)
    index = grid.plan(spec, cells)
    grid.write_plan(index, cells)
    names = index["cells"]
    if retry_failed:
        for name in names:
            result = grid.read_result(name)
            if result is not None and result["status"] in ("failed", "diverged"):
                grid.result_file(name).unlink()
    todo = [n for n in names if grid.read_result(n) is None]
    threads = {n: grid.read_cell(n)["config"]["train"]["threads"] for n in todo}
    progress.start(total=len(names), done=len(names) - len(todo))

    def on_done(name: str, code: int) -> None:
        result = grid.read_result(name)
        if result is None and code not in (0, 75, 130, 143, -2, -15):
            # The cell's process died without recording an outcome (killed, out of memory, ...).
            result = {"name": name, "status": "failed", "metrics": {}, "cost": {},
                      "error": f"the cell's process exited with code {code}; see cells/{name}.log"}
            write_json(grid.result_file(name), result)
        progress.cell_done(name, result["status"] if result else "interrupted",
                           (result or {}).get("cost", {}).get("cell_seconds"))
        from ..io import write_text

        write_text(grid.path / "results.csv", csv_text(grid.rows(), RESULT_COLUMNS))

    import time

    from .. import __version__

    started = time.perf_counter()
    finished = False
    try:
        if todo:
            executor.run(grid.path, todo, threads, on_done)
        finished = True
    finally:
        progress.stop()
        seconds = time.perf_counter() - started
        where = f"--executor {executor.name}" + (f" --jobs {executor.jobs}" if hasattr(executor, "jobs") else "")
        note = (f"Made by `elbokit benchmark grid` (elbokit {__version__}); its last invocation "
                f"{'ran' if finished else 'was interrupted after starting'} {len(todo)} cells in {seconds:.0f} s "
                f"of wall time ({where}).")
        summary = write_outputs(grid, header=(header + "\n\n" if header else "") + note, extra_markdown=extra_markdown)
    summary["ran"] = todo
    summary["wall_seconds"] = round(seconds, 1)
    return summary


def estimate_seconds(cells: list[Cell], grid: GridDir, jobs: int) -> dict[str, Any]:
    """A rough time for the cells without a result: each runs at most max_epochs epochs of
    ceil(n_train / batch) steps. Steps per second come from this grid's finished cells when
    there are any, else from STEPS_PER_SECOND (measured, see docs/grids.md), scaled by the
    model's size. Early stopping usually ends runs well before max_epochs, so this is an
    upper bound on the training time, plus the evaluation."""
    measured = []
    for name in grid.cell_names() if grid.read_index() else []:
        result = grid.read_result(name)
        if result and result["status"] == "ok" and result["cost"].get("steps_per_second"):
            measured.append(result["cost"]["steps_per_second"])
    total = 0.0
    todo = 0
    for cell in cells:
        if grid.read_index() and grid.result_file(cell.name).is_file():
            continue
        todo += 1
        cfg = cell.config
        n = cfg["data"]["n"] or 10000
        n_train = max(1, int(n * cfg["data"]["split"][0]))
        steps = cfg["train"]["max_epochs"] * max(1, n_train // min(cfg["train"]["batch_size"], n_train))
        hidden = (cfg["model"].get("options") or {}).get("hidden") or [400, 400]  # non-mlp models: the mlp's size
        hidden = [hidden] if isinstance(hidden, (int, float)) else hidden  # conv: one hidden layer size
        size = sum(hidden) / 800 * min(cfg["train"]["batch_size"], n_train) / 512
        rate = statistics.median(measured) if measured else STEPS_PER_SECOND / max(size, 0.05)
        total += steps / rate + EVAL_SECONDS
    return {"cells_to_run": todo, "upper_bound_seconds": round(total / max(1, jobs), 1),
            "source": "this grid's finished cells" if measured else "the reference speed in docs/grids.md"}


# The reference speed when the grid has no finished cell yet, from the README's measured main
# command (`ed` on dataset 2 with the paper's 2 x 400 MLP, batch 512, one thread: 50 epochs of
# 15 steps and the evaluation of 1000 test rows in 37 s on 2 CPU cores): about 25 steps per
# second and 5 s of evaluation and start-up. Finished cells of the grid replace it.
STEPS_PER_SECOND = 25.0
EVAL_SECONDS = 5.0
