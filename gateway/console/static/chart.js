// The console's line chart: which results can be drawn over time, and drawing one with uPlot
// (loaded before this module as the global `uPlot`, from uPlot.iife.min.js).
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
const ISO_TIME = /^(\d{4}-\d\d-\d\d)(?:[T ](\d\d:\d\d(?::\d\d(?:\.\d{1,3})?)?)\d*)?(Z|[+-]\d\d(?::?\d\d)?)?$/;
const HEIGHT = 320;
const MAX_GROUPS = 12; // a text column with at most this many values splits the lines by it

// Seconds since the epoch; a timestamp without a zone is read as UTC (as DuckDB wrote it).
function epochSeconds(value) {
  if (typeof value !== "string") return null;
  const match = ISO_TIME.exec(value);
  if (!match) return null;
  const ms = Date.parse(`${match[1]}T${match[2] || "00:00"}${match[3] || "Z"}`);
  return Number.isNaN(ms) ? null : ms / 1000;
}

// {time, values, group}: the first column whose values are all timestamps, every numeric
// column, and the one text column (if there is exactly one) with at most MAX_GROUPS values,
// which gets a line per value (a host, a region); null when there is nothing to draw.
export function chartable(result) {
  if (!result || !result.data.length) return null;
  const cols = result.columns.map((_, j) => result.data.map((row) => row[j]).filter((v) => v !== null));
  const time = cols.findIndex((values) => values.length && values.every((v) => epochSeconds(v) !== null));
  if (time < 0) return null;
  const values = [];
  const texts = [];
  cols.forEach((vs, j) => {
    if (j === time || !vs.length) return;
    if (vs.every((v) => typeof v === "number")) values.push(j);
    else if (vs.every((v) => typeof v === "string")) texts.push(j);
  });
  const group = texts.length === 1 && new Set(cols[texts[0]]).size <= MAX_GROUPS ? texts[0] : null;
  return values.length ? {time, values, group} : null;
}

// A uPlot of every row received in box, on one time axis (each distinct time once; a line
// has a gap where it has no row); the caller destroys it.
export function draw(box, result, spec) {
  const rows = result.data.map((row) => [epochSeconds(row[spec.time]), row]).filter(([t]) => t !== null);
  const times = [...new Set(rows.map(([t]) => t))].sort((a, b) => a - b);
  const slot = new Map(times.map((t, i) => [t, i]));
  const groups = spec.group === null ? [null]
    : [...new Set(rows.map(([, row]) => row[spec.group]))].sort();
  const lines = groups.flatMap((g) => spec.values.map((j) => ({g, j, ys: new Array(times.length).fill(null)})));
  for (const [t, row] of rows) {
    for (const line of lines) {
      if (spec.group === null || row[spec.group] === line.g) line.ys[slot.get(t)] ??= row[line.j];
    }
  }
  const data = [times, ...lines.map((line) => line.ys)];
  const series = [{}, ...lines.map(({g, j}, i) => ({
    label: spec.group === null ? result.columns[j] : `${result.columns[j]} ${g ?? "NULL"}`,
    stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true,
  }))];
  const {uPlot} = window;
  return new uPlot({
    width: Math.max(box.clientWidth, 300), height: HEIGHT, series,
    scales: {x: {time: true}},
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
  }, data, box);
}
