// Development build of the openherd web app. `npm run build` writes the production
// bundle into ../openherd/web/static (committed: users need no Node), then
// scripts/compress.mjs adds .br/.gz twins and reports the first-load size.
import { defineConfig } from "vite";

// Where `herd serve` listens during `npm run dev` (the dev server proxies the APIs to it).
const HERD = process.env.HERD_URL ?? "http://127.0.0.1:11435";

export default defineConfig({
  base: "/static/",
  build: {
    outDir: "../openherd/web/static",
    emptyOutDir: true,
    assetsDir: "assets",
    // The polyfill is an inline script: the CSP (script-src 'self') forbids those.
    modulePreload: { polyfill: false },
    cssCodeSplit: false,
    sourcemap: false,
    target: "es2020",
    reportCompressedSize: false,
    rollupOptions: {
      output: {
        // Hashed names under assets/ are what routes.py caches as immutable.
        entryFileNames: "assets/[name]-[hash].js",
        chunkFileNames: "assets/[name]-[hash].js",
        assetFileNames: "assets/[name]-[hash][extname]",
      },
    },
  },
  server: {
    proxy: Object.fromEntries(["/v1", "/api", "/metrics", "/health"].map((p) => [p, HERD])),
  },
});
