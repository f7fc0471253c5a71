"""`ProofSession`: step through a proof, inspect it, accept suggestions, inject hints, continue.

The session owns one capture of the problem and one engine; every user action is recorded, so a
session saves to JSON (never pickle) as the list of actions and reloads by replaying them. The
widget (`gg_notebook.widgets`) is a thin view over this class; everything here works without it.
"""

from __future__ import annotations

import dataclasses
import json
import linecache
import time
from dataclasses import dataclass
from typing import Any, Callable

from gg_notebook.engine.infer import Candidate, Engine, Step
from gg_notebook.engine.judge import judge
from gg_notebook.problem import Problem
from gg_notebook.result import Finding, Result, Status
from gg_notebook.session.hints import HintError, hint_from_callable, parse_hint
from gg_notebook.session.suggestions import Suggestion, engine_suggestions

FORMAT = "gg_notebook.session/1"


@dataclass(frozen=True)
class RelationView:
    """One relation of a sequential tensor, as the session shows it."""

    text: str
    status: str  # "proved" | "assumed" | "deferred"
    chain: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.text if self.status == "proved" else f"{self.text}  ({self.status})"


@dataclass(frozen=True)
class UserRelationView:
    """A relation the user gave (a hint or an accepted suggestion); ``index`` is for `retract`."""

    index: int
    node: str
    text: str
    status: str  # "assumed" (not derived by the engine) | "proved"
    origin: str  # "hint" | "accept"

    def __str__(self) -> str:
        return f"[{self.index}] {self.node}: {self.text}  ({self.status}, {self.origin})"


class ProofSession:
    """An interactive proof of ``problem`` (see the module docstring)."""

    def __init__(self, problem: Problem):
        from gg_notebook.verify import prepare

        self.problem = problem
        t0 = time.perf_counter()
        engine, stats = prepare(problem)
        self.stats = stats
        self.stats["prepare_s"] = time.perf_counter() - t0
        self._base = (engine.seq, engine.index, engine.store, engine.input_relations)
        self.engine: Engine = engine
        self.actions: list[dict] = []
        self._listeners: list[Callable[[str], None]] = []
        self._sims = None  # concrete simulations, computed on first need (None: not available)
        self._sims_error: str | None = None
        self._false: dict[tuple[str, int], str | None] = {}  # (node, expr id) -> why numerically false
        # user relations in the order they were added, for undo: {"node", "expr", "steps"} where
        # "steps" is len(engine.steps) right after the relation was added
        self._marks: list[dict] = []
        self._origin: dict[tuple[str, int], str] = {}  # (node, expr id) -> "hint" | "accept"
        self._typed: dict[tuple[str, int], str] = {}  # (node, expr id) -> the hint as the user typed it
        self.engine.typed_relations = self._typed  # the verdict lists assumptions as typed, too
        self.load_warnings: list[str] = []  # relations of a loaded session file that were not replayed
        self.version = 0
        self._result_cache: tuple | None = None  # ((version, engine id, concrete), Result)

    # ------------------------------------------------------------------ state
    @property
    def done(self) -> bool:
        """Finished: every operator visited (``stuck`` tells whether it finished stuck)."""
        return self.engine.done

    @property
    def stuck(self) -> Step | None:
        return self.engine.stuck_at

    @property
    def history(self) -> list[Step]:
        return list(self.engine.steps)

    @property
    def progress(self) -> tuple[int, int]:
        return self.engine.cursor, len(self.engine.seq.nodes)

    @property
    def current(self):
        """The operator the next step will process (or the one the proof is stuck at)."""
        if self.stuck is not None:
            return self.engine.seq.by_name[self.stuck.node]
        if self.engine.cursor < len(self.engine.seq.nodes):
            return self.engine.seq.nodes[self.engine.cursor]
        return None

    @property
    def relations(self) -> dict[str, list[RelationView]]:
        """The current relation set: sequential tensor -> its relations (proved / assumed)."""
        out: dict[str, list[RelationView]] = {}
        for name, cands in self.engine.relations.items():
            out[name] = [
                RelationView(self._shown(name, c),
                             "deferred" if c.deferred else ("assumed" if c.assumption else "proved"), c.chain)
                for c in cands
            ]
        return out

    def _shown(self, name: str, c) -> str:
        """A relation as text: a user's hint as typed, anything else as the engine prints it."""
        return self._typed.get((name, c.expr.id)) or self.engine.show(c.expr)

    def relations_for(self, names) -> dict[str, list[RelationView]]:
        """`relations` for just these tensors (cheap on big graphs)."""
        out = {}
        for name in names:
            cands = self.engine.relations.get(name)
            if cands is not None:
                out[name] = [RelationView(self._shown(name, c),
                                          "deferred" if c.deferred else ("assumed" if c.assumption else "proved"),
                                          c.chain) for c in cands]
        return out

    def status_of(self, node: str) -> str:
        """"unvisited" | "input" | "proved" | "assumed" | "deferred" | "stuck"."""
        if self.stuck is not None and self.stuck.node == node:
            return "stuck"
        cands = self.engine.relations.get(node)
        if cands is None:
            return "unvisited"
        if not cands:
            return "stuck"
        if all(c.deferred for c in cands):
            return "deferred"
        if self.engine.seq.by_name[node].op == "input":
            return "input"
        return "proved" if any(not c.assumption and not c.deferred for c in cands) else "assumed"

    @property
    def suggestions_node(self) -> str | None:
        """The tensor `suggestions()` is about: the stuck one, else the last visited one."""
        if self.stuck is not None:
            return self.stuck.node
        return self.engine.steps[-1].node if self.engine.steps else None

    def context(self, node=None, radius: int = 3) -> list[tuple[int, str, bool]]:
        """Source lines around ``node``'s line (default: the current one): (lineno, text, is_it)."""
        node = node if node is not None else self.current
        src = getattr(node, "source", None)
        if not src or ":" not in src:
            return []
        path, line = src.rsplit(":", 1)
        frames = getattr(node, "frames", ()) or ()
        if frames:
            path = frames[-1][0]
        try:
            lineno = int(line)
        except ValueError:
            return []
        out = []
        for k in range(max(1, lineno - radius), lineno + radius + 1):
            text = linecache.getline(path, k)
            if text:
                out.append((k, text.rstrip("\n"), k == lineno))
        return out

    def on_change(self, fn: Callable[[str], None]) -> None:
        """Call ``fn(action)`` after every state change (used by the widget)."""
        self._listeners.append(fn)

    def _changed(self, action: str) -> None:
        self.version += 1
        for fn in list(self._listeners):
            fn(action)

    # ------------------------------------------------------------------ actions
    def step(self) -> Step | None:
        """One rewrite iteration: the next sequential operator."""
        st = self.engine.step()
        if st is not None:
            self.actions.append({"op": "step"})
            self._changed("step")
        return st

    def run(self, until: str | None = None, max_steps: int | None = None,
            progress: Callable[[int], Any] | None = None) -> list[Step]:
        """Step until done or stuck, or until the next operator matches ``until`` (a source
        "file.py:LINE", an ATen op name prefix like "aten.bmm", or a node name); that operator is
        not executed, so the session stops right before it. An ``until`` that no operator ahead
        matches is refused (ValueError, nothing run) instead of silently running to the end.

        ``progress(steps_done)`` is called after every step; a true return value stops the run there
        (a cancel: the steps made so far are kept and recorded)."""
        if until is not None:
            until = until.strip()
            ahead = self.engine.seq.nodes[self.engine.cursor:]
            if not any(_matches(n, until) for n in ahead[1:]) and not self.engine.done:
                first = ahead[0] if ahead else None
                here = " (it is the next operator already: use Step)" if first is not None and _matches(first, until) else ""
                raise ValueError(f"no operator ahead matches {until!r}{here}: write a source line as file.py:LINE "
                                 f"(e.g. {_example_source(ahead)}), an ATen op name prefix (e.g. aten.mm) or a "
                                 f"node name; nothing was run")
        done: list[Step] = []
        cancelled = False
        while not self.engine.done:
            n = self.engine.seq.nodes[self.engine.cursor]
            if until is not None and done and _matches(n, until):
                break
            st = self.engine.step()
            if st is None:
                break
            done.append(st)
            if progress is not None and progress(len(done)):
                cancelled = True
                break
            if max_steps is not None and len(done) >= max_steps:
                break
            if until is not None and self.engine.cursor < len(self.engine.seq.nodes) and \
                    _matches(self.engine.seq.nodes[self.engine.cursor], until):
                break
        action = {"op": "run", "until": until, "steps": len(done)}
        if cancelled:
            action["cancelled"] = True
        self.actions.append(action)
        self._changed("run")
        return done

    def goto(self, k: int) -> None:
        """Move through the step history: undo steps back to ``k`` steps made, or step forward to
        it (the relations the user gave stay). ``k`` is clamped to what is possible."""
        k = max(0, int(k))
        moved = False
        while len(self.engine.steps) > k:
            if self.engine.undo() is None:
                break
            moved = True
        while len(self.engine.steps) < k and not self.engine.done:
            if self.engine.step() is None:
                break
            moved = True
        if moved:
            self.actions.append({"op": "goto", "steps": len(self.engine.steps)})
            self._changed("goto")

    def suggestions(self, node: str | None = None) -> list[Suggestion]:
        """Ranked candidate relations for the stuck tensor (or ``node``), each with its reason."""
        if node is None:
            node = self.suggestions_node
            if node is None:
                return []
        numeric = self._numeric_suggestions(node)
        engine = engine_suggestions(self.engine, node)
        if self.stuck is None or self.stuck.node != node:
            # not stuck: only relations that hold (derived, or matching numerically), no shape guesses
            engine = [x for x in engine if x.kind == "alternative"]
        seen = {x.text for x in numeric}
        out = numeric + [x for x in engine if x.text not in seen]
        # accepting is hinting: a guess is checked on the random inputs like a hint, and one that is
        # numerically false is marked (never acceptable) and ranked after the others
        for x in out:
            if not x.proved and x.expr is not None:
                x.numerically_false = self._check_cached(node, x.expr, "the suggestion")
        # ranked by evidence: derived, then numeric matches, then shape guesses, then the false ones
        # (a shape guess that the random inputs confirm is a numeric match: it says so)
        for x in out:
            if x.kind != "numeric" and not x.proved and x.numerically_false is None and x.expr is not None \
                    and self.simulations:
                x.checked = True
                x.reason = f"{x.reason}; matches on {len(self.simulations)} random inputs"
        return sorted(out, key=lambda x: x.rank)

    @property
    def simulations(self):
        """Concrete runs of both programs on a few random inputs (None if they cannot be simulated)."""
        if self._sims is None and self._sims_error is None:
            from gg_notebook.concrete.simulate import SimulationError, simulate

            try:
                self._sims = [simulate(self.problem, self.engine.seq, self.engine.index.graphs, seed=s)
                              for s in range(3)]
            except SimulationError as exc:
                self._sims_error = str(exc)
        return self._sims

    def _numeric_suggestions(self, node: str) -> list[Suggestion]:
        sims = self.simulations
        if not sims:
            return []
        from gg_notebook.concrete.search import candidates_for

        n = self.engine.seq.by_name[node]
        out = []
        for m in candidates_for(self.engine, sims, n, limit=6):
            out.append(Suggestion(node, self.engine.show(m.expr),
                                  f"matches on {len(sims)} random inputs ({m.kind}, max error {m.error:.2g})",
                                  20.0 - (0.5 if m.kind in ("view", "transpose") else 0), "numeric",
                                  proved=self._derivable(node, m.expr), expr=m.expr))
        return out

    def _check_cached(self, node: str, e, what: str) -> str | None:
        key = (node, e.id)
        if key not in self._false:
            self._false[key] = self.check_numerically(node, e, what="it")
        why = self._false[key]
        return None if why is None else why.replace(" but it gives ", f" but {what} gives ", 1)

    def check_numerically(self, node: str, e, what: str = "the hint") -> str | None:
        """None if relation ``e`` reproduces ``node``'s value on the random inputs, else why not
        (None too when the programs cannot be simulated: see `simulations`)."""
        sims = self.simulations
        if not sims:
            return None
        from gg_notebook.concrete.compare import close, max_error
        from gg_notebook.concrete.search import evaluate_relation

        for sim in sims:
            want = sim.seq[node]
            got = evaluate_relation(self.engine, e, sim)
            if got.shape != want.shape or not close(want, got, want.dtype):
                err, _ = max_error(want, got) if got.shape == want.shape else (float("inf"), 1)
                flat = (want.double() - got.double()).abs().reshape(-1).argmax() if got.shape == want.shape else 0
                w = float(want.reshape(-1)[flat]) if want.numel() else float("nan")
                g = float(got.reshape(-1)[flat]) if got.numel() else float("nan")
                return (f"it is numerically false: on random input seed {sim.seed}, {node} is {w:.6g} at flat "
                        f"index {int(flat)} but {what} gives {g:.6g} (max error {err:.3g})")
        return None

    def accept(self, k: int, node: str | None = None) -> RelationView:
        """Accept suggestion ``k`` (from `suggestions`); the proof continues from there.

        The same as typing it as a hint: a guess is checked on random inputs, and one that is
        numerically false is refused with ValueError (`HintError`) giving the disagreeing values,
        the session unchanged. An accepted guess is an *assumption* (`undo` or `retract` it)."""
        sugg = self.suggestions(node)
        if not 0 <= k < len(sugg):
            raise ValueError(f"there are {len(sugg)} suggestions; {k} is not one of them")
        s = sugg[k]
        if not s.proved:
            why = s.numerically_false or self.check_numerically(s.node, s.expr, what="the suggestion")
            if why is not None:
                raise HintError(f"suggestion {k} for {s.node} ({s.text}) cannot be accepted: {why}")
        self._add(s.node, s.expr, proved=s.proved, why=f"accepted: {s.reason}", origin="accept")
        self.actions.append({"op": "relation", "node": s.node, "text": s.text, "proved": s.proved,
                             "why": f"accepted: {s.reason}", "origin": "accept", "suggestion": k})
        self._changed("accept")
        return self.relations[s.node][0] if s.proved else next(
            r for r in self.relations.get(s.node, []) if r.text == s.text)

    def hint(self, tensor: str, expr: str | Callable) -> RelationView:
        """Inject a relation for sequential ``tensor``: hint syntax text or a callable (see hints.py).

        Refused with ValueError (state unchanged) for unknown names, shape mismatches and anything
        non-clean. A hint the engine cannot confirm is an *assumption*."""
        seq = self.engine.seq
        if tensor not in seq.by_name:
            close = [n for n in seq.by_name if n.startswith(tensor[:3])][:6]
            raise HintError(f"the sequential program has no tensor named {tensor!r}"
                            + (f" (similar: {', '.join(close)})" if close else ""))
        node = seq.by_name[tensor]
        e = hint_from_callable(expr, self.engine) if callable(expr) else parse_hint(expr, self.engine)
        if tuple(e.shape) != tuple(node.shape):
            raise HintError(f"the hint has shape {tuple(e.shape)} but {tensor} has shape {tuple(node.shape)}")
        proved = self._derivable(tensor, e)
        if not proved:
            why = self.check_numerically(tensor, e)
            if why is not None:
                raise HintError(f"hint for {tensor} refused: {why}")
        self._add(tensor, e, proved=proved, why="hint", origin="hint")
        text = self.engine.show(e)
        typed = expr.strip() if isinstance(expr, str) else text
        self._typed.setdefault((tensor, e.id), typed)  # shown back as typed (names of equal values differ)
        self.actions.append({"op": "relation", "node": tensor, "text": typed, "proved": proved, "why": "hint",
                             "origin": "hint"})
        self._changed("hint")
        view = next((r for r in self.relations.get(tensor, []) if r.text in (typed, text)),
                    RelationView(typed, "proved" if proved else "assumed"))
        return dataclasses.replace(view, text=typed)

    def undo(self) -> Step | UserRelationView | None:
        """Take back the last change: a hint or accepted suggestion made after the last step is
        retracted (what was derived from it is re-run), otherwise the last step is taken back.
        Returns the step or the retracted relation (None if there was nothing to undo)."""
        if self._marks and self._marks[-1]["steps"] >= len(self.engine.steps):
            m = self._marks[-1]
            view = self._view_of(m["node"], m["expr"])
            self._retract(m["node"], m["expr"])
            self.actions.append({"op": "undo", "what": "relation", "node": view.node, "text": view.text})
            self._changed("undo")
            return view
        st = self.engine.undo()
        if st is not None:
            self.actions.append({"op": "undo", "what": "step"})
            self._changed("undo")
        return st

    @property
    def user_relations(self) -> list[UserRelationView]:
        """The relations the user gave (hints, accepted suggestions), oldest first; `retract` takes
        one back by its ``index`` (or by tensor name)."""
        out: list[UserRelationView] = []
        for node, cands in self.engine.user_relations.items():
            for c in cands:
                out.append(UserRelationView(
                    len(out), node, self._shown(node, c),
                    "assumed" if c.assumption else "proved",
                    self._origin.get((node, c.expr.id), "hint")))
        return out

    def retract(self, node_or_index: str | int, relation: str | None = None) -> UserRelationView:
        """Remove a relation the user gave, and re-run what depended on it (the proof may be stuck
        again where it was). ``node_or_index``: an index into `user_relations`, or a tensor name
        (with ``relation``, its text, when the tensor has several). ValueError if there is none."""
        rels = self.user_relations
        if isinstance(node_or_index, int) and not isinstance(node_or_index, bool):
            if not 0 <= node_or_index < len(rels):
                raise ValueError(f"there are {len(rels)} user relations; {node_or_index} is not one of them"
                                 + (f" ({'; '.join(map(str, rels))})" if rels else ""))
            view = rels[node_or_index]
        else:
            mine = [r for r in rels if r.node == node_or_index and (relation is None or r.text == relation.strip())]
            if not mine:
                given = "; ".join(map(str, rels)) or "none"
                raise ValueError(f"no user relation for {node_or_index!r}"
                                 + (f" equal to {relation!r}" if relation is not None else "")
                                 + f" (user relations: {given})")
            if len(mine) > 1:
                raise ValueError(f"{node_or_index} has {len(mine)} user relations; pass the one to retract as "
                                 f"relation=..., one of: {', '.join(repr(r.text) for r in mine)}")
            view = mine[0]
        node, expr_id = self._user_ids()[view.index]
        self._retract(node, expr_id)
        self.actions.append({"op": "retract", "node": view.node, "text": view.text})
        self._changed("retract")
        return view

    def reset(self) -> None:
        """Start over (the capture is kept; hints are dropped)."""
        self.engine = Engine(*self._base)
        self.engine.typed_relations = self._typed
        self._marks = []
        self.actions.append({"op": "reset"})
        self._changed("reset")

    def result(self, concrete: bool | None = None) -> Result:
        """The same `Result` type as `gg.verify`, including the assumptions made so far (with any, the
        verdict is at most ``Status.ASSUMED``).

        Once the session is finished or stuck (``concrete=None``, the default), the verdict is the
        one `gg.verify` gives, through the same code path (`gg_notebook.verify.conclude`): a proof is
        validated, and an unknown or assumed verdict is checked on random inputs: refuted with a
        counterexample (a false assumption ends refuted too), or unknown with "the numbers agree: a
        lemma is missing". While in progress it is the symbolic judgement of the relations so far.
        ``concrete=False`` never runs the programs; ``concrete=True`` runs the checks even in progress.
        Computed once per session state (the concrete check can take seconds on a big model)."""
        if concrete is None:
            concrete = self.done
        key = (self.version, id(self.engine), len(self.engine.steps), self.engine.cursor, bool(concrete))
        if self._result_cache is None or self._result_cache[0] != key:
            stats = dict(self.stats)
            stats.update(self.engine.stats)
            if concrete:
                from gg_notebook.verify import conclude

                result = conclude(self.engine, self.problem, stats, exact="bitwise" if self.engine.bitwise else "real")
            else:
                result = judge(self.engine, self.problem, stats)
            if self.engine.user_relations and self._sims_error is not None:
                result.findings.append(Finding("not-checked", "the hints could not be checked on random inputs "
                                                              f"({self._sims_error})"))
            self._result_cache = (key, result)
        return self._snapshot(self._result_cache[1])

    @staticmethod
    def _snapshot(result: Result) -> Result:
        """A copy: later steps and hints must not change a result already handed out."""
        out = dataclasses.replace(result, relations=list(result.relations), findings=list(result.findings),
                                  assumptions=list(result.assumptions), stats=dict(result.stats),
                                  domain_assumptions=list(result.domain_assumptions))
        out.steps = [dataclasses.replace(st, candidates=list(st.candidates), pretty=list(st.pretty),
                                         inputs=dict(st.inputs)) for st in result.steps]
        return out

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "problem": self.problem.name, "world_size": self.problem.world_size,
                "actions": list(self.actions)}

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=1)

    @classmethod
    def load(cls, path, problem: Problem) -> "ProofSession":
        data = _read_session_file(path, problem)
        s = cls(problem)
        for a in data["actions"]:
            s._replay(a)
        return s

    def restore(self, path) -> None:
        """Load a saved session into this one (the capture is kept): start over, then replay the
        file's actions. ValueError, this session unchanged, for a file of another format or world size."""
        data = _read_session_file(path, self.problem)
        self.engine = Engine(*self._base)
        self.engine.typed_relations = self._typed
        self._marks, self._origin, self._false = [], {}, {}
        self._typed.clear()
        self.actions = []
        self.load_warnings = []
        for a in data["actions"]:
            self._replay(a)
        self._changed("load")

    def _replay(self, a: dict) -> None:
        op = a["op"]
        if op == "step":
            self.step()
        elif op == "goto":
            self.goto(a["steps"])
        elif op == "run":
            if a.get("cancelled") and not a.get("steps"):
                self.actions.append(dict(a))
                return
            try:
                steps = self.run(until=a.get("until"), max_steps=a.get("steps") or None)
            except ValueError:  # an "until" that matches nothing now: replay the same number of steps
                steps = self.run(max_steps=a.get("steps") or None)
            self.actions[-1]["steps"] = len(steps)
        elif op == "undo":
            if a.get("what") == "relation":  # (files without "what" predate undoing relations)
                if not self._marks:
                    raise ValueError("the session file undoes a relation, but none was added")
                m = self._marks[-1]
                self._retract(m["node"], m["expr"])
                self.actions.append(dict(a))
                self._changed("undo")
            elif self.engine.undo() is not None:
                self.actions.append({"op": "undo", "what": "step"})
                self._changed("undo")
        elif op == "reset":
            self.reset()
        elif op == "retract":
            self.retract(a["node"], a.get("text"))
        elif op == "relation":
            origin = a.get("origin") or ("accept" if str(a.get("why", "")).startswith("accepted") else "hint")
            if a.get("refused"):  # refused when it was loaded before: kept in the file, not applied
                self.actions.append(dict(a, origin=origin))
                return
            e = parse_hint(a["text"], self.engine)
            proved = bool(a.get("proved")) and self._derivable(a["node"], e)
            if not proved:
                why = self.check_numerically(a["node"], e)
                if why is not None:  # e.g. a guess accepted before accepting was checked: not applied
                    self.load_warnings.append(f"{a['node']}: {a['text']} ({origin}) was not applied: {why}")
                    self.actions.append(dict(a, origin=origin, refused=why))
                    return
            self._add(a["node"], e, proved=proved, why=a.get("why", "hint"), origin=origin)
            self._typed.setdefault((a["node"], e.id), a["text"].strip())
            self.actions.append(dict(a, proved=proved, origin=origin))
            self._changed(origin if origin == "accept" else "hint")
        else:
            raise ValueError(f"unknown action {op!r} in a session file")

    # ------------------------------------------------------------------ helpers
    def _derivable(self, node: str, e) -> bool:
        """Is ``e`` equal (as a term) to a relation the engine derived for ``node``?"""
        t = self.engine.to_term(e).id
        return any(not c.assumption and not c.deferred and self.engine.to_term(c.expr).id == t
                   for c in self.engine.relations.get(node, []))

    def _add(self, node: str, e, *, proved: bool, why: str, origin: str = "hint") -> None:
        if proved:
            cands = self.engine.relations.get(node, [])
            keep = [c for c in cands if c.expr.id == e.id] + [c for c in cands if c.expr.id != e.id]
            if keep and keep[0].expr.id == e.id:
                self.engine.relations[node] = keep
                return
        had = any(c.expr.id == e.id for c in self.engine.user_relations.get(node, []))
        self.engine.add_user_relation(node, Candidate(e, (why,), assumption=not proved))
        if not had:
            self._origin.setdefault((node, e.id), origin)
            self._marks.append({"node": node, "expr": e.id, "steps": len(self.engine.steps)})

    def _user_ids(self) -> list[tuple[str, int]]:
        """(node, expr id) of each user relation, in `user_relations` order."""
        return [(n, c.expr.id) for n, cs in self.engine.user_relations.items() for c in cs]

    def _view_of(self, node: str, expr_id: int) -> UserRelationView:
        return self.user_relations[self._user_ids().index((node, expr_id))]

    def _retract(self, node: str, expr_id: int) -> None:
        """Drop a user relation; take back the steps from its node on and run them again (up to where
        the session was, or until stuck), so nothing derived from it survives."""
        eng = self.engine
        keep = [c for c in eng.user_relations.get(node, []) if c.expr.id != expr_id]
        if keep:
            eng.user_relations[node] = keep
        else:
            eng.user_relations.pop(node, None)
        self._marks = [m for m in self._marks if (m["node"], m["expr"]) != (node, expr_id)]
        self._origin.pop((node, expr_id), None)
        self._typed.pop((node, expr_id), None)
        step = next((st for st in eng.steps if st.node == node), None)
        if step is None:  # not visited yet: it was only pending
            return
        target = eng.cursor
        eng.undo_to(step.index)
        while eng.cursor < target and not eng.done:
            eng.step()

    # ------------------------------------------------------------------ display
    def widget(self):
        from gg_notebook.widgets import SessionWidget

        return SessionWidget(self)

    def _ipython_display_(self):  # pragma: no cover - exercised in notebooks
        from IPython.display import display

        try:
            display(self.widget())
        except ImportError:
            display(self.result())

    def __repr__(self) -> str:
        done, total = self.progress
        state = "stuck at " + self.stuck.node if self.stuck else ("done" if self.done else "in progress")
        return f"<ProofSession {self.problem.name}: {done}/{total} operators, {state}>"


def _read_session_file(path, problem: Problem) -> dict:
    with open(path) as f:
        data = json.load(f)
    if data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a gg_notebook session file (format {data.get('format')!r})")
    if data.get("world_size") != problem.world_size:
        raise ValueError(f"{path} was saved for world_size={data.get('world_size')}, "
                         f"the problem has world_size={problem.world_size}")
    return data


def _example_source(nodes) -> str:
    for n in nodes:
        if n.source:
            return n.source.rsplit("/", 1)[-1]
    return "model.py:12"


def _matches(node, until: str) -> bool:
    if until.startswith("spec:"):  # a name as the widget shows it
        until = until[len("spec:"):]
    if ".py:" in until or until.rsplit(":", 1)[-1].isdigit() and ":" in until:
        src = node.source or ""
        if not src:
            return False
        return src == until or src.endswith("/" + until) or until.endswith(src) or \
            src.rsplit("/", 1)[-1] == until.rsplit("/", 1)[-1]
    return node.name == until or node.target.startswith(until)
