// The console's line chart: which results can be drawn over time, and drawing one with uPlot
// (loaded before this module as the global `uPlot`, from uPlot.iife.min.js).
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];
const ISO_TIME = /^(\d{4}-\d\d-\d\d)(?:[T ](\d\d:\d\d(?::\d\d(?:\.\d{1,3})?)?)\d*)?(Z|[+-]\d\d(?::?\d\d)?)?$/;
const HEIGHT = 320;

// Seconds since the epoch; a timestamp without a zone is read as UTC (as DuckDB wrote it).
function epochSeconds(value) {
  if (typeof value !== "string") return null;
  const match = ISO_TIME.exec(value);
  if (!match) return null;
  const ms = Date.parse(`${match[1]}T${match[2] || "00:00"}${match[3] || "Z"}`);
  return Number.isNaN(ms) ? null : ms / 1000;
}

// {time, values}: the first column whose values are all timestamps and every numeric column;
// null when the result has no such pair.
export function chartable(result) {
  if (!result || !result.data.length) return null;
  const cols = result.columns.map((_, j) => result.data.map((row) => row[j]).filter((v) => v !== null));
  const time = cols.findIndex((values) => values.length && values.every((v) => epochSeconds(v) !== null));
  if (time < 0) return null;
  const values = [];
  cols.forEach((vs, j) => {
    if (j !== time && vs.length && vs.every((v) => typeof v === "number")) values.push(j);
  });
  return values.length ? {time, values} : null;
}

// A uPlot of every row received (sorted by time) in box; the caller destroys it.
export function draw(box, result, spec) {
  const rows = result.data
    .map((row) => [epochSeconds(row[spec.time]), row])
    .filter(([t]) => t !== null)
    .sort((a, b) => a[0] - b[0]);
  const data = [rows.map(([t]) => t), ...spec.values.map((j) => rows.map(([, row]) => row[j]))];
  const series = [{}, ...spec.values.map((j, i) => ({
    label: result.columns[j], stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true,
  }))];
  const {uPlot} = window;
  return new uPlot({
    width: Math.max(box.clientWidth, 300), height: HEIGHT, series,
    scales: {x: {time: true}},
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
  }, data, box);
}
