// Bundle src/graph_widget.js (cytoscape + cytoscape-dagre) into one minified ESM file shipped inside
// the Python package: ../gg_notebook/widgets/static/graph_widget.js. Run `npm ci && npm run build`
// here after changing src/ or package.json, and commit the bundle (CI and users never run npm).
import { build } from "esbuild";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = resolve(here, "../gg_notebook/widgets/static/graph_widget.js");

await build({
  entryPoints: [resolve(here, "src/graph_widget.js")],
  bundle: true,
  format: "esm",
  minify: true,
  target: ["es2020"],
  legalComments: "eof",
  outfile: out,
  banner: { js: "// gg_notebook graph view: built by js/build.mjs from js/src/graph_widget.js (cytoscape, cytoscape-dagre, dagre: MIT). Do not edit." },
  logLevel: "info",
});
