"""The sharding picture: which rank holds which block of a sequential (global) tensor.

For a relation ``t = expr`` (a clean expression over rank values), `sharding_layout` finds out, for
every element of ``t``, which rank values it is built from, by evaluating ``expr`` on *provenance*
tensors: each distinct rank value (``ref`` leaf) gets one bit, views / permutes / slices /
concatenations / expands move the bits like the values, and a sum (max, min) over ranks ORs them and
marks the element as a partial sum (a reduction). The tensor is then cut at every place where the
provenance changes along some dim, which gives a grid of blocks, each uniformly built:

* ``shard``: one rank value held by one rank;
* ``replica``: one rank value held (identically) by several ranks;
* ``partial``: a sum (or max / min) of values from several ranks (no rank holds the block itself);
* ``constant``: built from no rank value (an input-independent constant);
* ``computed``: a non-clean relation (a deferred operator applied to rank values).

`sharding_html` draws the layout as an SVG of blocks coloured by rank (like DTensor's
``visualize_sharding``), a block held by several ranks striped with their colours, a partial sum
marked with a dashed border and a sum sign, plus a text table of the blocks.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

import torch

from gg_notebook.relations.expr import Expr, apply_op, fold

MAX_ELEMENTS = 1 << 21  # provenance tensors: int64 + int8 + bool, about 20 MB at most
MAX_LEAVES = 62
MAX_BLOCKS = 256

# colour-blind-friendly-ish palette (Okabe-Ito + Tableau), one per rank modulo its length
RANK_COLOURS = ("#56B4E9", "#E69F00", "#009E73", "#F0E442", "#CC79A7", "#0072B2", "#D55E00", "#999933",
                "#88CCEE", "#AA4499", "#44AA99", "#DDCC77", "#117733", "#332288", "#882255", "#6699CC")
_REDUCE = {0: "", 1: "sum", 2: "max", 3: "min"}


def rank_colour(r: int) -> str:
    return RANK_COLOURS[r % len(RANK_COLOURS)]


@dataclass
class Block:
    region: tuple[tuple[int, int], ...]  # [start, end) per dim of the global tensor
    kind: str  # shard / replica / partial / constant / computed
    pieces: tuple[int, ...]  # indices into Layout.leaves
    ranks: tuple[int, ...]  # every rank holding (a piece of) the block
    reduce: str = ""  # "sum" / "max" / "min" for a partial block

    def describe(self, layout: "Layout") -> str:
        where = "[" + ", ".join(f"{a}:{b}" for a, b in self.region) + "]"
        names = [layout.leaves[i][0] for i in self.pieces]
        rk = ", ".join(f"r{r}" for r in self.ranks)
        if self.kind == "shard":
            return f"{where} held by {rk} ({names[0]})"
        if self.kind == "replica":
            return f"{where} replicated on {rk} ({names[0]})"
        if self.kind == "partial":
            return f"{where} partial {self.reduce or 'sum'} over {rk}: {self.reduce or 'sum'}({', '.join(names)})"
        if self.kind == "constant":
            return f"{where} a constant (no rank value)"
        return f"{where} computed from {', '.join(names) or 'constants'} (not a clean relation)"


@dataclass
class Layout:
    shape: tuple[int, ...]
    blocks: list[Block] = field(default_factory=list)
    leaves: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)  # (label, ranks holding it)
    split_dims: tuple[int, ...] = ()
    cuts: dict = field(default_factory=dict)  # dim -> [0, c1, .., size]
    truncated: bool = False

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({r for b in self.blocks for r in b.ranks}))


class TooLarge(ValueError):
    pass


def _provenance(engine, expr: Expr):
    """(bits, reduce, computed, leaves) tensors of expr's shape (see the module docstring)."""
    index = engine.index
    leaf_bit: dict[int, int] = {}
    leaves: list[tuple[str, tuple[int, ...]]] = []

    def node(x: Expr, args):
        shape = tuple(x.shape)
        if x.op in ("ref", "atom"):
            key = x.id
            if key not in leaf_bit:
                if len(leaves) >= MAX_LEAVES:
                    raise TooLarge(f"more than {MAX_LEAVES} rank values")
                leaf_bit[key] = len(leaves)
                if x.op == "ref":
                    dv = index.dvals[x.attrs[0]]
                    ranks = tuple(sorted({r for r, _ in dv.locations}))
                    leaves.append((engine.name(x), ranks))
                else:
                    leaves.append((str(x.attrs[0]), ()))
            bits = torch.full(shape, 1 << leaf_bit[key], dtype=torch.int64)
            zero = torch.zeros(shape, dtype=torch.int8)
            return bits, zero, zero.bool()
        if x.op == "const":
            zero = torch.zeros(shape, dtype=torch.int8)
            return torch.zeros(shape, dtype=torch.int64), zero, zero.bool()
        if x.op == "accum":
            bits = args[0][0].clone()
            red = torch.maximum(args[0][1], torch.zeros_like(args[0][1]))
            comp = args[0][2].clone()
            for b, r, c in args[1:]:
                bits |= b
                red = torch.maximum(red, r)
                comp |= c
            code = {"sum": 1, "max": 2, "min": 3}.get(x.attrs, 1)
            # an element is a partial reduction where two or more summands are rank values
            count = torch.zeros(shape, dtype=torch.int64)
            for b, _, _ in args:
                count += (b != 0).to(torch.int64)
            several = count >= 2
            red = torch.where(several, torch.full_like(red, code), red)
            return bits, red, comp
        if x.op in ("view", "permute", "slice", "cat", "expand"):
            outs = []
            for k in range(3):
                vals = [a[k] for a in args]
                if x.op == "slice":
                    vals = [vals[0]]
                outs.append(apply_op(x.op, x.attrs, vals).contiguous() if x.op != "expand"
                            else apply_op(x.op, x.attrs, vals))
            return tuple(outs)
        # call / scale: a non-clean expression; every element depends on all of its arguments
        allbits = 0
        red = 0
        for b, r, _ in args:
            if b.numel():
                v = b.flatten()
                acc = 0
                for u in torch.unique(v).tolist():
                    acc |= int(u)
                allbits |= acc
                red = max(red, int(r.max()))
        return (torch.full(shape, allbits, dtype=torch.int64), torch.full(shape, red, dtype=torch.int8),
                torch.ones(shape, dtype=torch.bool))

    bits, red, comp = fold(expr, node)
    return bits, red, comp, leaves


def _cuts(t: torch.Tensor, dim: int) -> list[int]:
    n = t.shape[dim]
    if n <= 1:
        return [0, n]
    a, b = t.narrow(dim, 1, n - 1), t.narrow(dim, 0, n - 1)
    diff = a != b
    other = [d for d in range(t.dim()) if d != dim]
    if other:
        diff = diff.permute([dim] + other).reshape(n - 1, -1).any(dim=1)
    where = (torch.nonzero(diff).flatten() + 1).tolist()
    return [0] + where + [n]


def sharding_layout(engine, expr: Expr) -> Layout:
    """The block layout of ``expr`` (see the module docstring); raises `TooLarge` for tensors
    of more than ``MAX_ELEMENTS`` elements or more than ``MAX_LEAVES`` distinct rank values."""
    shape = tuple(expr.shape)
    if math.prod(shape) > MAX_ELEMENTS:
        raise TooLarge(f"{math.prod(shape)} elements")
    bits, red, comp, leaves = _provenance(engine, expr)
    lay = Layout(shape, leaves=leaves)
    if bits.dim() == 0:
        bits, red, comp = bits.reshape(1), red.reshape(1), comp.reshape(1)
        shape1 = (1,)
    else:
        shape1 = shape
    key = torch.stack([bits, red.to(torch.int64), comp.to(torch.int64)], dim=-1)
    cuts = {}
    for d in range(len(shape1)):
        cuts[d] = _cuts(key, d) if shape1[d] > 0 else [0, 0]
    lay.cuts = cuts
    lay.split_dims = tuple(d for d in range(len(shape1)) if len(cuts[d]) > 2)
    # the grid of blocks: every combination of intervals along the split dims
    intervals = [list(zip(cuts[d][:-1], cuts[d][1:])) for d in range(len(shape1))]
    total = math.prod(len(iv) for iv in intervals)
    if total > MAX_BLOCKS:
        lay.truncated = True
    import itertools

    for combo in itertools.islice(itertools.product(*intervals), MAX_BLOCKS):
        at = tuple(a for a, _ in combo)
        b = int(bits[at]) if bits.numel() else 0
        r = int(red[at]) if red.numel() else 0
        c = bool(comp[at]) if comp.numel() else False
        pieces = tuple(i for i in range(len(leaves)) if b >> i & 1)
        ranks = tuple(sorted({rr for i in pieces for rr in leaves[i][1]}))
        if c:
            kind = "computed"
        elif not pieces:
            kind = "constant"
        elif r:
            kind = "partial"
        elif len(ranks) > 1:
            kind = "replica"
        else:
            kind = "shard"
        region = combo if len(shape) else ()
        lay.blocks.append(Block(tuple(region), kind, pieces, ranks, _REDUCE.get(r, "")))
    return lay


# ---------------------------------------------------------------------------- drawing
def _esc(s) -> str:
    return html.escape(str(s))


def _extent_scale(cuts: list[int], total_px: float, min_px: float) -> list[float]:
    """Pixel positions of the cuts: proportional to extent, each interval at least min_px."""
    n = cuts[-1] - cuts[0]
    k = len(cuts) - 1
    if n <= 0 or k <= 0:
        return [0.0, total_px]
    free = max(total_px - k * min_px, 0.0)
    pos = [0.0]
    for a, b in zip(cuts[:-1], cuts[1:]):
        pos.append(pos[-1] + min_px + free * (b - a) / n)
    return pos


def _block_svg(x, y, w, h, blk: Block, lay: Layout, gid: str, k: int) -> str:
    ranks = blk.ranks
    defs = ""
    if blk.kind in ("constant",):
        fill = "#eeeeee"
    elif len(ranks) == 1:
        fill = rank_colour(ranks[0])
    elif ranks:
        pid = f"{gid}-p{k}"
        stripe = 16
        bands = "".join(f"<rect x='{i * stripe}' y='0' width='{stripe}' height='{stripe * len(ranks)}' "
                        f"fill='{rank_colour(r)}'/>" for i, r in enumerate(ranks))
        defs = (f"<defs><pattern id='{pid}' patternUnits='userSpaceOnUse' width='{stripe * len(ranks)}' "
                f"height='{stripe * len(ranks)}' patternTransform='rotate(45)'>{bands}</pattern></defs>")
        fill = f"url(#{pid})"
    else:
        fill = "#dddddd"
    dash = " stroke-dasharray='6,3' stroke-width='2.5'" if blk.kind in ("partial", "computed") else ""
    opacity = " fill-opacity='0.45'" if blk.kind in ("partial", "computed") else ""
    if blk.kind == "partial":
        label = f"partial \u03a3 {' + '.join(f'r{r}' for r in ranks)}" if (blk.reduce or "sum") == "sum" \
            else f"partial {blk.reduce}({', '.join(f'r{r}' for r in ranks)})"
    elif blk.kind == "constant":
        label = "const"
    elif blk.kind == "computed":
        label = "f(" + ", ".join(f"r{r}" for r in ranks) + ")"
    elif blk.kind == "replica":
        label = "replicated: " + " ".join(f"r{r}" for r in ranks)
    else:
        label = " ".join(f"r{r}" for r in ranks)
    title = _esc(blk.describe(lay))
    text = ""
    if w >= 18 and h >= 14:
        fs = 12
        maxc = max(int(w / 7), 1)
        shown = label if len(label) <= maxc else label[: max(maxc - 1, 1)] + "\u2026"
        text = (f"<text x='{x + w / 2:.1f}' y='{y + h / 2 + 4:.1f}' text-anchor='middle' "
                f"font-family='monospace' font-size='{fs}' fill='#111'"
                f" style='paint-order:stroke;stroke:#fff;stroke-width:3px'>{_esc(shown)}</text>")
    return (f"{defs}<g class='gg-block' data-kind='{blk.kind}' data-ranks='{','.join(map(str, ranks))}' "
            f"data-region='{_esc(blk.region)}'><title>{title}</title>"
            f"<rect x='{x:.1f}' y='{y:.1f}' width='{w:.1f}' height='{h:.1f}' fill='{fill}' "
            f"stroke='#333' stroke-width='1.2'{opacity}{dash}/>{text}</g>")


_COUNTER = [0]


def layout_svg(lay: Layout, width: int = 360, height: int = 180) -> str:
    """The blocks as SVG: rows = the first split dim, columns = the second (or the only one, as
    columns when it is the last dim); further split dims are drawn as separate panels."""
    _COUNTER[0] += 1
    gid = f"ggsh{_COUNTER[0]}"
    nd = len(lay.shape)
    split = list(lay.split_dims)
    if len(split) >= 2:
        rdim, cdim = split[-2], split[-1]
    elif len(split) == 1:
        rdim, cdim = (None, split[0]) if split[0] == nd - 1 or nd == 1 else (split[0], None)
    else:
        rdim, cdim = None, None
    rcuts = lay.cuts.get(rdim, [0, 1]) if rdim is not None else [0, 1]
    ccuts = lay.cuts.get(cdim, [0, 1]) if cdim is not None else [0, 1]
    # panels: the blocks grouped by their intervals along the other split dims
    outer = [d for d in split if d not in (rdim, cdim)]
    panels: dict[tuple, list] = {}
    for b in lay.blocks:
        key = tuple(b.region[d] for d in outer)
        panels.setdefault(key, []).append(b)
    keys = list(panels)[:8]
    pad, head = 4, 16 if outer else 0
    ph = height if len(keys) <= 1 else max(60, height // 2)
    rows_px = _extent_scale(rcuts, ph - 2 * pad - head, 16 if rdim is not None else 0)
    cols_px = _extent_scale(ccuts, width - 2 * pad, 22 if cdim is not None else 0)
    out = []
    y0 = 0
    for kk, key in enumerate(keys):
        if outer:
            lab = ", ".join(f"dim {d} {a}:{b}" for d, (a, b) in zip(outer, key))
            out.append(f"<text x='{pad}' y='{y0 + 12}' font-size='11' font-family='sans-serif' fill='#555'>"
                       f"{_esc(lab)}</text>")
        for k, b in enumerate(panels[key]):
            ri = rcuts.index(b.region[rdim][0]) if rdim is not None else 0
            ci = ccuts.index(b.region[cdim][0]) if cdim is not None else 0
            x, w = pad + cols_px[ci], cols_px[ci + 1] - cols_px[ci]
            y, h = y0 + pad + head + rows_px[ri], rows_px[ri + 1] - rows_px[ri]
            out.append(_block_svg(x, y, w, h, b, lay, gid, kk * 1000 + k))
        y0 += ph
    axis = []
    if rdim is not None:
        axis.append(f"rows: dim {rdim}")
    if cdim is not None:
        axis.append(f"columns: dim {cdim}")
    cap = (f"<div style='font-size:11px;color:#555'>global shape {_esc(tuple(lay.shape))}"
           + (f"; {', '.join(axis)}" if axis else "; not split") + "</div>")
    return (cap + f"<svg class='gg-sharding-svg' xmlns='http://www.w3.org/2000/svg' width='{width}' "
            f"height='{y0}' viewBox='0 0 {width} {y0}'>" + "".join(out) + "</svg>")


def _legend(lay: Layout) -> str:
    items = "".join(f"<span style='display:inline-block;margin-right:6px'><span style='display:inline-block;"
                    f"width:11px;height:11px;background:{rank_colour(r)};border:1px solid #333;"
                    f"vertical-align:middle'></span> rank {r}</span>" for r in lay.ranks)
    kinds = {b.kind for b in lay.blocks}
    notes = []
    if "replica" in kinds:
        notes.append("striped: the same value on several ranks (replicas)")
    if "partial" in kinds:
        notes.append("pale, dashed: a partial sum (no rank holds it; the ranks' pieces add up to it)")
    if "computed" in kinds:
        notes.append("dashed f(..): computed from the ranks' values (not a clean relation)")
    note = f"<div style='font-size:11px;color:#555'>{'; '.join(notes)}</div>" if notes else ""
    return f"<div style='font-size:11px'>{items}</div>{note}"


def sharding_html(engine, expr: Expr, title: str = "", max_rows: int = 16) -> str:
    """The picture (SVG + legend + a table of blocks) of one relation, in a ``div.gg-sharding``;
    a short note instead when it cannot be drawn."""
    try:
        lay = sharding_layout(engine, expr)
    except TooLarge as exc:
        return f"<div class='gg-sharding gg-sharding-none' style='font-size:11px;color:#666'>" \
               f"no sharding picture: too large ({_esc(exc)})</div>"
    rows = "".join(f"<tr><td style='font-family:monospace'>{_esc(b.describe(lay))}</td></tr>"
                   for b in lay.blocks[:max_rows])
    more = f"<tr><td>... {len(lay.blocks) - max_rows} more blocks</td></tr>" if len(lay.blocks) > max_rows else ""
    trunc = "<div style='font-size:11px'>(more blocks than drawn: a fine-grained layout)</div>" \
        if lay.truncated else ""
    return (f"<div class='gg-sharding' data-tensor='{_esc(title)}' data-blocks='{len(lay.blocks)}'>"
            + layout_svg(lay) + _legend(lay) + trunc
            + f"<details><summary style='font-size:11px'>blocks ({len(lay.blocks)})</summary>"
              f"<table style='font-size:11px'>{rows}{more}</table></details></div>")
