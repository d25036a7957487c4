// After `vite build`: write .br and .gz twins of every compressible file (routes.py
// serves them by Accept-Encoding), then report what the first load transfers:
// index.html plus everything it references, gzip-compressed. The budget is 300 KB.
import { brotliCompressSync, constants, gzipSync } from "node:zlib";
import { readFileSync, readdirSync, statSync, writeFileSync } from "node:fs";
import { join, relative } from "node:path";

const OUT = new URL("../../openherd/web/static/", import.meta.url).pathname;
const COMPRESSIBLE = /\.(js|css|html|svg|json|txt)$/;
const BUDGET = 300 * 1024;

function walk(dir) {
  return readdirSync(dir).flatMap((name) => {
    const p = join(dir, name);
    return statSync(p).isDirectory() ? walk(p) : [p];
  });
}

for (const file of walk(OUT)) {
  if (!COMPRESSIBLE.test(file)) continue;
  const data = readFileSync(file);
  if (data.length < 512) continue;
  // mtime 0 in the gzip header: the same input gives the same bytes (reproducible builds).
  writeFileSync(file + ".gz", gzipSync(data, { level: 9 }));
  writeFileSync(
    file + ".br",
    brotliCompressSync(data, { params: { [constants.BROTLI_PARAM_QUALITY]: 11, [constants.BROTLI_PARAM_SIZE_HINT]: data.length } }),
  );
}

const index = readFileSync(join(OUT, "index.html"), "utf8");
const refs = [...index.matchAll(/(?:src|href)="\/static\/([^"]+)"/g)].map((m) => m[1]);
let total = gzipSync(readFileSync(join(OUT, "index.html")), { level: 9 }).length;
const rows = [["index.html", total]];
for (const ref of refs) {
  const size = gzipSync(readFileSync(join(OUT, ref)), { level: 9 }).length;
  rows.push([ref, size]);
  total += size;
}
for (const [name, size] of rows) console.log(`${(size / 1024).toFixed(1).padStart(8)} KB  ${name}`);
console.log(`${(total / 1024).toFixed(1).padStart(8)} KB  first load, gzip (budget ${BUDGET / 1024} KB)`);
if (total > BUDGET) {
  console.error("first load is over budget");
  process.exit(1);
}
console.log(`built into ${relative(process.cwd(), OUT)}`);
