// The Prometheus text format (0.0.4) as /metrics writes it, parsed in the browser:
// the dashboard shows the very figures a Prometheus server would scrape.

export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

const LINE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/;
const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

export function parsePrometheus(text: string): Sample[] {
  const out: Sample[] = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = LINE.exec(line);
    if (!m) continue;
    const labels: Record<string, string> = {};
    if (m[3]) for (const l of m[3].matchAll(LABEL)) labels[l[1]] = l[2].replace(/\\n/g, "\n").replace(/\\"/g, '"').replace(/\\\\/g, "\\");
    const v = m[4] === "+Inf" ? Infinity : m[4] === "-Inf" ? -Infinity : Number(m[4]);
    out.push({ name: m[1], labels, value: v });
  }
  return out;
}

/** Sum of every series of `name` (all label sets). */
export function total(samples: Sample[], name: string): number {
  let s = 0;
  for (const x of samples) if (x.name === name && isFinite(x.value)) s += x.value;
  return s;
}

/** Cumulative bucket counts of a histogram, summed over label sets other than `le`. */
export function buckets(samples: Sample[], name: string): Map<number, number> {
  const out = new Map<number, number>();
  for (const x of samples) {
    if (x.name !== `${name}_bucket`) continue;
    const le = x.labels.le === "+Inf" ? Infinity : Number(x.labels.le);
    out.set(le, (out.get(le) ?? 0) + x.value);
  }
  return out;
}

/** Bucket counts observed between two scrapes (a window), from cumulative counters. */
export function bucketDelta(now: Map<number, number>, before: Map<number, number> | null): Map<number, number> {
  const out = new Map<number, number>();
  for (const [le, c] of now) out.set(le, Math.max(0, c - (before?.get(le) ?? 0)));
  return out;
}

/** Prometheus' histogram_quantile: linear interpolation inside the bucket holding the rank. */
export function quantile(q: number, cumulative: Map<number, number>): number | null {
  const bs = Array.from(cumulative.entries()).sort((a, b) => a[0] - b[0]);
  if (!bs.length) return null;
  const count = bs[bs.length - 1][1];
  if (!count) return null;
  const rank = q * count;
  let prevLe = 0;
  let prevCount = 0;
  for (const [le, c] of bs) {
    if (c >= rank) {
      if (le === Infinity) return prevLe; // the highest finite bound is all we know
      if (c === prevCount) return le;
      return prevLe + ((le - prevLe) * (rank - prevCount)) / (c - prevCount);
    }
    prevLe = le;
    prevCount = c;
  }
  return prevLe;
}
