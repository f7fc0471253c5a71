// The graph view of gg_notebook: an anywidget front-end drawing the session's graph with
// cytoscape (canvas) and the dagre layered layout. Bundled by ../build.mjs into
// gg_notebook/widgets/static/graph_widget.js (one ESM file, committed; CI does not run npm).
//
// Model (see gg_notebook/widgets/graph_widget.py):
//   graph     {nodes: [{id, name, op, shape, line, code, module, output?}], edges: [[a, b]], world_size}
//   state     {current, status: {id: status}, neighbourhood: [ids], rank_nodes: [...], rank_edges, links}
//   mode      "neighbourhood" | "full" | "ranks" (the full model and every rank's whole graph)
//   rank_graph {nodes, edges} of every rank (sent by the kernel only in the "ranks" mode)
//   group_by  "" | "line" | "module"
//   selected  node id clicked here (the kernel answers with `detail`, HTML for the side panel)
//   detail    HTML
//   height    px of the canvas
// For tests, the canvas element carries data-zoom, data-nodes, data-current, data-min-font
// (the smallest rendered label font in px among the drawn nodes) and `_cy` (the cytoscape core).

import cytoscape from "cytoscape";
import dagre from "cytoscape-dagre";

cytoscape.use(dagre);

const STATUS_COLOURS = {
  proved: "#a6e3a1",
  current: "#89b4fa",
  stuck: "#f38ba8",
  assumed: "#fab387",
  deferred: "#f9e2af",
  unvisited: "#e4e4e4",
};
const RANK_COLOURS = ["#56B4E9", "#E69F00", "#009E73", "#F0E442", "#CC79A7", "#0072B2", "#D55E00", "#999933",
  "#88CCEE", "#AA4499", "#44AA99", "#DDCC77", "#117733", "#332288", "#882255", "#6699CC"];
const STATUS_RANK = { stuck: 5, current: 4, assumed: 3, deferred: 2, proved: 1, unvisited: 0 };
const FONT_PX = 12; // label font at zoom 1; the default zoom is never below 1
const MIN_DEFAULT_ZOOM = 1.0;
const MAX_DEFAULT_ZOOM = 1.5;

function rankColour(r) {
  return RANK_COLOURS[r % RANK_COLOURS.length];
}

function shortShape(shape) {
  return shape ? "[" + shape.join(",") + "]" : "";
}

const DAGRE = { name: "dagre", rankDir: "TB", nodeSep: 18, rankSep: 36, edgeSep: 8, animate: false, fit: false };
const CHAR_PX = 0.61 * FONT_PX; // monospace advance
const LINE_HEIGHT = 1.35; // underscores stay clear of the next line
function labelSize(n) {
  const lines = String(n.data("label") || "").split("\n");
  const w = Math.max(...lines.map((l) => l.length)) * CHAR_PX + 4;
  return { w: Math.max(w, 20), h: lines.length * FONT_PX * LINE_HEIGHT + 2 };
}

const STYLE = [
  {
    selector: "node",
    style: {
      shape: "round-rectangle",
      label: "data(label)",
      "font-family": "monospace",
      "font-size": FONT_PX,
      "text-wrap": "wrap",
      "line-height": LINE_HEIGHT,
      "text-valign": "center",
      "text-halign": "center",
      width: (n) => labelSize(n).w,
      height: (n) => labelSize(n).h,
      padding: "6px",
      "background-color": "data(bg)",
      "border-width": 1,
      "border-color": "#555",
      color: "#111",
      "min-zoomed-font-size": 5,
    },
  },
  { selector: "node.output", style: { "border-width": 2, "border-style": "double", "border-color": "#333" } },
  {
    selector: "node.rank",
    style: { "border-width": 3, "border-color": "data(rc)", "background-color": "#ffffff" },
  },
  { selector: "node.rank.related", style: { "background-color": "#e8f5e9", "border-width": 5 } },
  { selector: "node.group.related", style: { "background-color": "#e8f5e9" } },
  {
    selector: "node.group",
    style: {
      shape: "rectangle",
      "background-color": "data(bg)",
      "border-width": 2,
      "border-style": "dashed",
      "border-color": "#6a6a6a",
    },
  },
  {
    selector: ":parent",
    style: {
      label: "data(label)",
      "text-valign": "top",
      "text-halign": "center",
      "font-size": FONT_PX,
      "background-color": "#f6f8fa",
      "background-opacity": 0.6,
      "border-width": 1,
      "border-color": "#999",
      "border-style": "solid",
      padding: "10px",
    },
  },
  { selector: ":parent.rankbox", style: { "border-color": "data(rc)", "border-width": 2 } },
  {
    selector: "node.current",
    style: { "border-width": 5, "border-color": "#1f6feb", "background-color": STATUS_COLOURS.current },
  },
  { selector: "node.stuck", style: { "border-width": 5, "border-color": "#cf222e" } },
  { selector: "node.selected", style: { "border-width": 4, "border-color": "#d63384" } },
  { selector: "node.match", style: { "border-width": 5, "border-color": "#ff8c00", "underlay-color": "#ffb000",
    "underlay-opacity": 0.35, "underlay-padding": 6 } },
  { selector: ".dim", style: { opacity: 0.25 } },
  {
    selector: "edge",
    style: {
      width: 1.2,
      "line-color": "#777",
      "target-arrow-color": "#777",
      "target-arrow-shape": "triangle",
      "arrow-scale": 0.8,
      "curve-style": "bezier",
    },
  },
  { selector: "edge.rankedge", style: { "line-color": "#aaa", "target-arrow-color": "#aaa" } },
  {
    selector: "edge.link",
    style: { "line-style": "dotted", "line-color": "#2e7d32", width: 2, "target-arrow-shape": "none" },
  },
];

function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function render({ model, el: host }) {
  const root = el("div", { class: "gg-gw" });
  host.appendChild(root);

  // ---------------------------------------------------------------- toolbar
  const bar = el("div", { class: "gg-gw-bar" });
  const modeSel = el("select", { class: "gg-gw-mode", title: "what to draw" });
  for (const [v, t] of [["neighbourhood", "neighbourhood of the current operator"], ["full", "full model"],
    ["ranks", "full model and every rank's graph"]]) {
    modeSel.appendChild(el("option", { value: v }, t));
  }
  const groupSel = el("select", { class: "gg-gw-group", title: "collapse operators by" });
  for (const [v, t] of [["", "no grouping"], ["line", "group by source line"], ["module", "group by function / module"]]) {
    groupSel.appendChild(el("option", { value: v }, t));
  }
  const search = el("input", { class: "gg-gw-search", type: "search", placeholder: "search: name, op, line, code",
    title: "Enter: next match" });
  const count = el("span", { class: "gg-gw-count" });
  const mk = (cls, text, title) => {
    const b = el("button", { class: "gg-gw-btn " + cls, title, type: "button" }, text);
    bar.appendChild(b);
    return b;
  };
  const note = el("span", { class: "gg-gw-note" });
  bar.append(modeSel, groupSel, search, count, note);
  const zoomOut = mk("gg-gw-zoom-out", "\u2212", "zoom out");
  const zoomIn = mk("gg-gw-zoom-in", "+", "zoom in");
  const fitBtn = mk("gg-gw-fit", "Fit", "fit the whole graph in view");
  const curBtn = mk("gg-gw-current", "Current", "center on the current operator at a readable zoom");
  const expandBtn = mk("gg-gw-expand", "Expand all", "expand every group");
  const collapseBtn = mk("gg-gw-collapse", "Collapse all", "collapse every group");
  root.appendChild(bar);

  const body = el("div", { class: "gg-gw-body" });
  const canvas = el("div", { class: "gg-gw-canvas" });
  const side = el("div", { class: "gg-gw-detail" });
  body.append(canvas, side);
  root.appendChild(body);
  const legend = el("div", { class: "gg-gw-legend" });
  for (const [k, t] of [["proved", "proved"], ["current", "current"], ["stuck", "stuck"], ["assumed", "assumed"],
    ["deferred", "deferred"], ["unvisited", "not yet visited"]]) {
    const s = el("span", { class: "gg-gw-key" }, t);
    s.style.background = STATUS_COLOURS[k];
    legend.appendChild(s);
  }
  legend.appendChild(el("span", { class: "gg-gw-key gg-gw-key-rank" }, "rank operator (border: rank colour)"));
  legend.appendChild(el("span", { class: "gg-gw-key gg-gw-key-link" }, "\u2504 used by the relation of"));
  root.appendChild(legend);

  const setHeight = () => {
    canvas.style.height = (model.get("height") || 520) + "px";
  };
  setHeight();

  // created once the canvas is attached and has a size (cytoscape cannot start detached)
  let cy = null;

  const collapsed = new Set(); // group keys collapsed
  let groupsInitFor = null; // group_by value the default collapse was computed for
  let structureKey = null; // what the current layout was computed for
  let matches = [];
  let matchAt = -1;

  // ---------------------------------------------------------------- elements
  // group keys are per program: the specification's "gpt_block.py:41" and rank 0's "r0 gpt_block.py:41"
  function groupOf(n, by) {
    if (!by || !n[by]) return null;
    return n.rank === undefined ? n[by] : "r" + n.rank + " " + n[by];
  }

  function build() {
    const graph = model.get("graph") || { nodes: [], edges: [] };
    const state = model.get("state") || {};
    const mode = model.get("mode") || "neighbourhood";
    const by = model.get("group_by") || "";
    const status = state.status || {};
    const cur = state.current;
    const nbh = new Set(state.neighbourhood || []);
    const allRanks = mode === "ranks";
    const rg = allRanks ? model.get("rank_graph") || {} : {};
    const full = mode !== "neighbourhood" || nbh.size === 0;
    const byId = new Map(graph.nodes.map((n) => [n.id, n]));
    const shownSeq = graph.nodes.filter((n) => full || nbh.has(n.id));
    // rank operators: the related ones (neighbourhood), or every rank's whole graph ("ranks")
    const related = new Map((state.rank_nodes || []).map((r) => [r.id, r]));
    const shownRank = allRanks ? rg.nodes || [] : full ? [] : state.rank_nodes || [];
    const rankEdges = allRanks ? rg.edges || [] : full ? [] : state.rank_edges || [];

    // groups: the default is everything collapsed except the current operator's group
    if (by && groupsInitFor !== by) {
      collapsed.clear();
      const curNode = cur ? byId.get(cur) : null;
      const keep = curNode ? groupOf(curNode, by) : null;
      for (const n of graph.nodes.concat(rg.nodes || [])) {
        const g = groupOf(n, by);
        if (g && g !== keep) collapsed.add(g);
      }
      groupsInitFor = by;
    }
    if (!by) groupsInitFor = null;

    const all = shownSeq.concat(shownRank);
    const groupCount = new Map();
    for (const n of all) {
      const g = groupOf(n, by);
      if (g) groupCount.set(g, (groupCount.get(g) || 0) + 1);
    }
    const elements = [];
    const rep = new Map(); // node id -> drawn node id
    const groupStatus = new Map();
    const groupMembers = new Map();
    const ranks = new Set();
    for (const n of all) {
      const isRank = n.rank !== undefined;
      if (isRank) ranks.add(n.rank);
      const rel = isRank ? related.get(n.id) : null;
      const st = isRank ? (rel ? "related" : "rank") : n.id === cur ? (state.stuck ? "stuck" : "current") : status[n.id] || "unvisited";
      const g = groupOf(n, by);
      const outer = isRank ? "rankbox:" + n.rank : undefined;
      if (g && collapsed.has(g) && groupCount.get(g) > 1) {
        const gid = "grp:" + g;
        rep.set(n.id, gid);
        const prev = groupStatus.get(gid);
        if (!isRank && (prev === undefined || STATUS_RANK[st] > STATUS_RANK[prev])) groupStatus.set(gid, st);
        if (!groupMembers.has(gid)) groupMembers.set(gid, { key: g, members: [], outer, rank: n.rank });
        groupMembers.get(gid).members.push(n);
        continue;
      }
      rep.set(n.id, n.id);
      const classes = isRank ? ["rank"] : ["seq", st];
      if (rel && rel.used) classes.push("used");
      if (rel) classes.push("related");
      if (n.output) classes.push("output");
      const data = {
        id: n.id, label: n.name + "\n" + n.op + " " + shortShape(n.shape), bg: STATUS_COLOURS[st] || "#ffffff",
        name: n.name, op: n.op, line: n.line || "", code: n.code || "", module: n.module || "", status: st,
      };
      if (isRank) {
        data.rank = n.rank;
        data.rc = rankColour(n.rank);
      }
      if (g && groupCount.get(g) > 1) data.parent = "box:" + g;
      else if (outer) data.parent = outer;
      elements.push({ group: "nodes", data, classes: classes.join(" ") });
    }
    // expanded groups: compound boxes labelled with the group key (inside their rank's box)
    const boxParent = new Map(all.map((n) => [groupOf(n, by), n.rank !== undefined ? "rankbox:" + n.rank : undefined]));
    for (const [g, k] of groupCount) {
      if (k > 1 && !collapsed.has(g)) {
        const data = { id: "box:" + g, label: g, group: g, name: g, op: "", line: "", code: "" };
        if (boxParent.get(g)) data.parent = boxParent.get(g);
        elements.push({ group: "nodes", data, classes: "box" });
      }
    }
    for (const [gid, info] of groupMembers) {
      const st = groupStatus.get(gid) || (info.rank !== undefined ? "rank" : "unvisited");
      const first = info.members[0];
      const code = first.code ? "\n" + (first.code.length > 40 ? first.code.slice(0, 39) + "\u2026" : first.code) : "";
      const data = {
        id: gid, label: info.key + code + "\n(" + info.members.length + " operators)",
        bg: STATUS_COLOURS[st] || "#ffffff", group: info.key,
        name: info.members.map((m) => m.name).join(" "), op: info.members.map((m) => m.op).join(" "),
        line: info.key, code: first.code || "", status: st,
      };
      if (info.outer) {
        data.parent = info.outer;
        data.rc = rankColour(info.rank);
      }
      const rel = info.members.some((m) => related.has(m.id));
      elements.push({
        group: "nodes", data,
        classes: "group " + st + (info.members.some((m) => m.id === cur) ? " has-current" : "") + (rel ? " related" : ""),
      });
    }
    for (const r of ranks) {
      elements.push({ group: "nodes", data: { id: "rankbox:" + r, label: "rank " + r, rc: rankColour(r), name: "", op: "", line: "", code: "" },
        classes: "rankbox" });
    }
    const seen = new Set();
    const addEdge = (a, b, cls) => {
      const ra = rep.get(a);
      const rb = rep.get(b);
      if (!ra || !rb || ra === rb) return;
      const id = (cls === "link" ? "l:" : "e:") + ra + "->" + rb;
      if (seen.has(id)) return;
      seen.add(id);
      elements.push({ group: "edges", data: { id, source: ra, target: rb }, classes: cls });
    };
    for (const [a, b] of graph.edges) addEdge(a, b, "");
    for (const [a, b] of rankEdges) addEdge(a, b, "rankedge");
    // dotted links: a sequential input -> the rank operators its relation uses (not part of the layout)
    for (const [a, b] of state.links || []) addEdge(a, b, "link");
    const key = [mode, by, [...collapsed].sort().join("|"), full ? "" : (state.neighbourhood || []).join(","),
      full ? "" : (state.rank_nodes || []).map((r) => r.id).join(","), graph.nodes.length, (rg.nodes || []).length].join("#");
    return { elements, full, key };
  }

  // every program (the specification, each rank) laid out by itself, side by side: one dagre run
  // over everything with compound boxes is much slower (10 s for 800 operators)
  function layoutPrograms() {
    const boxes = cy.nodes(".rankbox");
    const parts = [cy.nodes().filter((n) => !n.hasClass("rankbox") && n.ancestors(".rankbox").empty())];
    boxes.forEach((b) => parts.push(b.descendants()));
    let x = 0;
    for (const part of parts) {
      if (part.empty()) continue;
      const edges = part.connectedEdges().filter((e) => part.contains(e.source()) && part.contains(e.target()));
      part.union(edges).layout(DAGRE).run();
      const bb = part.boundingBox();
      part.filter((n) => !n.isParent()).shift({ x: x - bb.x1, y: -bb.y1 });
      x += bb.w + 120;
    }
  }

  function currentEle() {
    const cur = (model.get("state") || {}).current;
    if (!cur) return cy.collection();
    let e = cy.getElementById(cur);
    if (e.nonempty()) return e;
    e = cy.nodes(".has-current");
    return e;
  }

  function defaultView() {
    // fit, but never below a zoom where labels are smaller than FONT_PX (nor zoomed in absurdly);
    // then center on the current operator
    cy.fit(undefined, 20);
    let z = cy.zoom();
    if (z < MIN_DEFAULT_ZOOM || z > MAX_DEFAULT_ZOOM) {
      z = Math.min(Math.max(z, MIN_DEFAULT_ZOOM), MAX_DEFAULT_ZOOM);
      cy.zoom(z);
      const c = currentEle();
      cy.center(c.nonempty() ? c : cy.nodes().first());
    } else {
      const c = currentEle();
      if (c.nonempty()) {
        const bb = c.renderedBoundingBox();
        if (bb.x1 < 0 || bb.y1 < 0 || bb.x2 > cy.width() || bb.y2 > cy.height()) cy.center(c);
      }
    }
    report();
  }

  function ensureCurrentVisible() {
    const c = currentEle();
    if (c.empty()) return;
    const bb = c.renderedBoundingBox();
    const m = 20;
    if (bb.x1 < m || bb.y1 < m || bb.x2 > cy.width() - m || bb.y2 > cy.height() - m) {
      if (cy.zoom() < MIN_DEFAULT_ZOOM) cy.zoom(MIN_DEFAULT_ZOOM);
      cy.center(c);
    }
  }

  function report() {
    if (!cy) return;
    const z = cy.zoom();
    canvas.dataset.zoom = z.toFixed(3);
    canvas.dataset.nodes = String(cy.nodes().length);
    const c = currentEle();
    canvas.dataset.current = c.nonempty() ? c.id() : "";
    let minFont = Infinity;
    const w = cy.width();
    const h = cy.height();
    cy.nodes().forEach((n) => {
      const bb = n.renderedBoundingBox({ includeLabels: false });
      if (bb.x2 < 0 || bb.y2 < 0 || bb.x1 > w || bb.y1 > h) return; // off screen
      const f = parseFloat(n.style("font-size")) * z;
      if (f < minFont) minFont = f;
    });
    canvas.dataset.minFont = Number.isFinite(minFont) ? minFont.toFixed(2) : "";
  }

  function applyClasses() {
    if (!cy) return;
    const sel = model.get("selected");
    cy.nodes().removeClass("selected");
    if (sel) cy.getElementById(sel).addClass("selected");
  }

  function redraw(force) {
    if (!cy) return;
    const { elements, key, full } = build();
    const rg = model.get("mode") === "ranks" ? model.get("rank_graph") || {} : {};
    note.textContent = rg.too_large ? "the ranks hold " + rg.too_large + " operators (more than " + rg.max_nodes
      + " to draw): the specification only" : model.get("mode") === "ranks" && !rg.nodes ? "loading the ranks' graphs…" : "";
    if (!force && key === structureKey) {
      // same structure: update data (status colours, labels) in place, keep the viewport
      cy.batch(() => {
        for (const e of elements) {
          if (e.group !== "nodes") continue;
          const n = cy.getElementById(e.data.id);
          if (n.empty()) continue;
          n.data("bg", e.data.bg);
          n.data("status", e.data.status);
          n.classes(e.classes || "");
        }
        cy.edges(".link").remove();
        cy.add(elements.filter((e) => e.group === "edges" && e.classes === "link"));
      });
      applyClasses();
      runSearch(false);
      ensureCurrentVisible();
      report();
      return;
    }
    structureKey = key;
    cy.batch(() => {
      cy.elements().remove();
      cy.add(elements);
    });
    applyClasses();
    const t0 = performance.now();
    const links = full ? cy.edges(".link") : cy.collection();
    links.remove(); // the dotted links do not shape the layout in the full views
    if (model.get("mode") === "ranks") layoutPrograms();
    else cy.layout(DAGRE).run();
    links.restore();
    canvas.dataset.layoutMs = (performance.now() - t0).toFixed(0);
    runSearch(false);
    defaultView();
  }

  // ---------------------------------------------------------------- search
  function runSearch(jump) {
    if (!cy) return;
    const q = search.value.trim().toLowerCase();
    cy.elements().removeClass("match dim");
    matches = [];
    if (!q) {
      count.textContent = "";
      matchAt = -1;
      return;
    }
    cy.nodes().forEach((n) => {
      if (n.isParent()) return;
      const d = n.data();
      const hay = [d.name, d.op, d.line, d.code, d.module].join("\n").toLowerCase();
      if (hay.includes(q)) matches.push(n);
    });
    if (matches.length) {
      const m = cy.collection(matches);
      cy.elements().not(m).not(m.ancestors()).addClass("dim");
      m.addClass("match");
    }
    const total = (model.get("graph").nodes || []).filter((n) =>
      [n.name, n.op, n.line || "", n.code || "", n.module || ""].join("\n").toLowerCase().includes(q)).length;
    count.textContent = matches.length + " match" + (matches.length === 1 ? "" : "es")
      + (total > matches.length && model.get("mode") !== "full" ? " (" + total + " in the full model)" : "");
    canvas.dataset.matches = String(matches.length);
    if (jump) {
      matchAt = -1;
      nextMatch();
    }
  }

  function nextMatch() {
    if (!cy) return;
    if (!matches.length) return;
    matchAt = (matchAt + 1) % matches.length;
    const m = matches[matchAt];
    if (cy.zoom() < MIN_DEFAULT_ZOOM) cy.zoom(MIN_DEFAULT_ZOOM);
    cy.center(m);
    report();
  }

  // ---------------------------------------------------------------- events
  function init() {
    cy = cytoscape({
      container: canvas,
      style: STYLE,
      minZoom: 0.002,
      maxZoom: 4,
      boxSelectionEnabled: false,
      autoungrabify: true,
    });
    canvas._cy = cy;
    cy.on("tap", "node", (evt) => {
      const n = evt.target;
      const id = n.id();
      if (id.startsWith("grp:")) {
        collapsed.delete(n.data("group"));
        redraw(true);
        return;
      }
      if (id.startsWith("box:")) {
        collapsed.add(n.data("group"));
        redraw(true);
        return;
      }
      if (id.startsWith("rankbox:")) return;
      model.set("selected", id);
      model.save_changes();
      applyClasses();
    });
    cy.on("zoom pan", () => {
      canvas.dataset.zoom = cy.zoom().toFixed(3);
    });
    cy.on("zoom", () => report());
  }

  const zoomBy = (f) => {
    if (!cy) return;
    cy.zoom({ level: cy.zoom() * f, renderedPosition: { x: cy.width() / 2, y: cy.height() / 2 } });
    report();
  };
  zoomIn.addEventListener("click", () => zoomBy(1.25));
  zoomOut.addEventListener("click", () => zoomBy(0.8));
  fitBtn.addEventListener("click", () => {
    if (!cy) return;
    cy.fit(undefined, 20);
    report();
  });
  curBtn.addEventListener("click", () => {
    if (!cy) return;
    if (cy.zoom() < MIN_DEFAULT_ZOOM) cy.zoom(MIN_DEFAULT_ZOOM);
    const c = currentEle();
    if (c.nonempty()) cy.center(c);
    report();
  });
  expandBtn.addEventListener("click", () => {
    collapsed.clear();
    redraw(true);
  });
  collapseBtn.addEventListener("click", () => {
    const by = model.get("group_by");
    if (!by) return;
    for (const n of model.get("graph").nodes || []) {
      const g = n[by];
      if (g) collapsed.add(g);
    }
    redraw(true);
  });
  search.addEventListener("input", () => runSearch(false));
  search.addEventListener("keydown", (e) => {
    if (e.key === "Enter") {
      e.preventDefault();
      if (matchAt < 0) runSearch(true);
      else nextMatch();
    }
  });
  modeSel.addEventListener("change", () => {
    model.set("mode", modeSel.value);
    model.save_changes();
    redraw(true);
  });
  groupSel.addEventListener("change", () => {
    model.set("group_by", groupSel.value);
    model.save_changes();
    redraw(true);
  });

  const syncControls = () => {
    modeSel.value = model.get("mode") || "neighbourhood";
    groupSel.value = model.get("group_by") || "";
  };
  const onDetail = () => {
    side.innerHTML = model.get("detail") || "<i>click a node for its relations, lemmas and sharding</i>";
  };
  const onGraph = () => {
    groupsInitFor = null;
    redraw(true);
  };
  const onState = () => redraw(false);
  const onMode = () => {
    syncControls();
    redraw(true);
  };
  model.on("change:graph", onGraph);
  model.on("change:state", onState);
  model.on("change:mode", onMode);
  model.on("change:group_by", onMode);
  model.on("change:rank_graph", onMode);
  model.on("change:detail", onDetail);
  model.on("change:selected", applyClasses);
  model.on("change:height", () => {
    setHeight();
    if (cy) cy.resize();
  });
  syncControls();
  onDetail();

  // the output area may not be laid out yet: draw once the canvas has a size, and follow resizes
  let drawn = false;
  const ro = new ResizeObserver(() => {
    if (canvas.clientWidth === 0 || canvas.clientHeight === 0 || !canvas.isConnected) return;
    if (!drawn) {
      drawn = true;
      init();
      redraw(true);
    } else {
      cy.resize();
      report();
    }
  });
  ro.observe(canvas);

  return () => {
    ro.disconnect();
    model.off("change:graph", onGraph);
    model.off("change:state", onState);
    model.off("change:mode", onMode);
    model.off("change:group_by", onMode);
    model.off("change:rank_graph", onMode);
    model.off("change:detail", onDetail);
    model.off("change:selected", applyClasses);
    if (cy) cy.destroy();
  };
}

export default { render };
