// uPlot wrappers: a live line chart and a grouped bar chart. uPlot draws on a
// canvas and styles its few DOM nodes through the CSSOM (el.style), which the
// CSP allows; it needs no inline <style> or style attributes.

import uPlot from "uplot";

export interface Series {
  label: string;
  color: string;
  dash?: number[];
  points?: boolean;
}

function cssVar(name: string, fallback: string): string {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || fallback;
}

function axes(xLabel: string, yLabel: string, xTime: boolean): uPlot.Axis[] {
  const stroke = cssVar("--muted", "#888");
  const grid = { stroke: cssVar("--grid", "rgba(128,128,128,.15)"), width: 1 };
  return [
    // Steps are whole numbers: no ticks at 1.5.
    { stroke, grid, label: xLabel, ...(xTime ? {} : { incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000] }) },
    { stroke, grid, label: yLabel, size: 60 },
  ];
}

export class LineChart {
  readonly el: HTMLElement;
  private plot: uPlot | null = null;
  private observer: ResizeObserver;

  constructor(
    private series: Series[],
    private opts: { xLabel: string; yLabel: string; time?: boolean; height?: number; testid?: string; window?: number },
  ) {
    this.el = document.createElement("div");
    this.el.className = "chart";
    if (opts.testid) this.el.dataset.testid = opts.testid;
    this.observer = new ResizeObserver(() => this.resize());
    this.observer.observe(this.el);
  }

  private width(): number {
    return Math.max(240, this.el.clientWidth || 600);
  }

  private resize(): void {
    this.plot?.setSize({ width: this.width(), height: this.opts.height ?? 260 });
  }

  /** data[0]: x values; data[i]: the i-th series (null = no point). */
  set(data: (number | null)[][]): void {
    if (!this.plot) {
      const options: uPlot.Options = {
        width: this.width(),
        height: this.opts.height ?? 260,
        scales: {
          x: {
            time: !!this.opts.time,
            // A live chart shows a fixed window ending now, not whatever few points exist yet.
            range: this.opts.window ? (_u, _min, max) => [max - this.opts.window!, max] : undefined,
          },
        },
        axes: axes(this.opts.xLabel, this.opts.yLabel, !!this.opts.time),
        legend: { show: true },
        cursor: { drag: { x: true, y: false } },
        series: [
          { label: this.opts.xLabel },
          ...this.series.map((s) => ({
            label: s.label,
            stroke: s.color,
            width: 2,
            dash: s.dash,
            spanGaps: true,
            points: { show: s.points ?? false, size: 6, fill: s.color },
          })),
        ],
      };
      this.plot = new uPlot(options, data as uPlot.AlignedData, this.el);
    } else {
      this.plot.setData(data as uPlot.AlignedData);
    }
    this.el.dataset.points = String(data[0]?.length ?? 0);
  }

  destroy(): void {
    this.observer.disconnect();
    this.plot?.destroy();
    this.plot = null;
  }
}

/** Grouped bars: one group per category (x), one bar per series, drawn with uPlot's bars path. */
export class BarChart {
  readonly el: HTMLElement;
  private plot: uPlot | null = null;

  constructor(testid?: string) {
    this.el = document.createElement("div");
    this.el.className = "chart";
    if (testid) this.el.dataset.testid = testid;
  }

  set(categories: string[], series: { label: string; color: string; values: (number | null)[] }[]): void {
    this.plot?.destroy();
    // Aligned data needs one x array: give every (category, series) its own x slot around
    // the category's centre, and each series a value only in its own slots.
    const n = Math.max(1, series.length);
    const slot = 0.8 / n;
    const xs: number[] = [];
    const ys: (number | null)[][] = series.map(() => []);
    categories.forEach((_, k) => {
      series.forEach((s, i) => {
        xs.push(k - 0.4 + (i + 0.5) * slot);
        ys.forEach((col, j) => col.push(j === i ? s.values[k] ?? null : null));
      });
    });
    const top = Math.max(1e-9, ...series.flatMap((s) => s.values.map((v) => v ?? 0)));
    const options: uPlot.Options = {
      width: Math.max(280, this.el.clientWidth || 560),
      height: 260,
      scales: { x: { time: false, range: [-0.6, categories.length - 0.4] }, y: { range: [0, top <= 1 ? 1 : top * 1.1] } },
      axes: [
        {
          stroke: cssVar("--muted", "#888"),
          grid: { show: false },
          splits: () => categories.map((_, k) => k),
          values: () => categories,
        },
        { stroke: cssVar("--muted", "#888"), grid: { stroke: cssVar("--grid", "rgba(128,128,128,.15)") }, size: 50 },
      ],
      legend: { show: true },
      cursor: { show: false },
      series: [
        { label: "metric" },
        ...series.map((s) => ({
          label: s.label,
          stroke: s.color,
          fill: s.color,
          width: 0,
          paths: uPlot.paths.bars!({ size: [0.9, Infinity], align: 0 }),
          points: { show: false },
        })),
      ],
    };
    this.plot = new uPlot(options, [xs, ...ys] as uPlot.AlignedData, this.el);
    this.el.dataset.bars = String(categories.length * series.length);
  }

  destroy(): void {
    this.plot?.destroy();
    this.plot = null;
  }
}
