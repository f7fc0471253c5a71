// Bundle src/graph_widget.js (cytoscape + cytoscape-dagre) into one minified ESM file shipped inside
// the Python package: ../gg_notebook/widgets/static/graph_widget.js. Run `npm ci && npm run build`
// here after changing src/ or package.json, and commit the bundle (CI and users never run npm).
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { build } from "esbuild";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = resolve(here, "../gg_notebook/widgets/static/graph_widget.js");
// the sources' digest goes into the banner: tests/test_graph_view.py recomputes it, so a bundle that
// was not rebuilt after a change of src/ or of the locked dependencies fails the suite
const digest = createHash("sha256");
for (const f of ["src/graph_widget.js", "package-lock.json"]) digest.update(readFileSync(resolve(here, f)));
const sources = digest.digest("hex").slice(0, 16);

await build({
  entryPoints: [resolve(here, "src/graph_widget.js")],
  bundle: true,
  format: "esm",
  minify: true,
  target: ["es2020"],
  legalComments: "eof",
  outfile: out,
  banner: { js: `// gg_notebook graph view: built by js/build.mjs from js/src/graph_widget.js (cytoscape, cytoscape-dagre, dagre: MIT). Do not edit. sources=${sources}` },
  logLevel: "info",
});
