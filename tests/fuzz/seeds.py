"""Fuzz seeds: programs earlier fuzz runs found falsely proved or falsely refuted, kept as regression cases.

Each seed is a module file in ``seeds/`` (the full mutated program, as the fuzzer built it) whose first
line names how to build and judge it::

    # fuzz-seed: subject=program:row_parallel_linear world_size=2 dtype=float64 operator=cast_before_reduce intent=wrong found=false_proof

``subject`` says how the module becomes a Problem (and which input domain ground truth uses); the
verdict the seed must get is decided afresh by ground truth every time, never taken from the header.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass

SEED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")
_HEADER = re.compile(r"^# fuzz-seed: (.*)$")


@dataclass(frozen=True)
class Seed:
    name: str
    subject: str
    world_size: int
    dtype: str
    operator: str
    intent: str
    found: str
    source: str


def load_seeds() -> list[Seed]:
    out = []
    for path in sorted(glob.glob(os.path.join(SEED_DIR, "*.py"))):
        with open(path) as f:
            source = f.read()
        m = _HEADER.match(source.splitlines()[0]) if source else None
        if not m:
            raise ValueError(f"{path}: first line must be a '# fuzz-seed: key=value ...' header")
        meta = dict(kv.split("=", 1) for kv in m.group(1).split())
        out.append(Seed(os.path.basename(path)[:-3], meta["subject"], int(meta["world_size"]), meta["dtype"],
                        meta.get("operator", ""), meta.get("intent", ""), meta.get("found", ""), source))
    return out


def write_seed(record: dict, name: str, directory: str = SEED_DIR) -> str:
    """Save a finding (a results-JSON record with its source) as a seed file; returns the path."""
    header = (f"# fuzz-seed: subject={record['subject']} world_size={record['world_size']} dtype={record['dtype']} "
              f"operator={record['operator']} intent={record['intent']} found={record['outcome']}\n"
              f"# {record['operator']} {record.get('choice', '')!s} at line {record.get('line', 0)} of the specialized "
              f"source; verdict then: {record['verdict']}; ground truth: {record['ground_truth'].get('detail', '')}\n")
    path = os.path.join(directory, f"{name}.py")
    with open(path, "w") as f:
        f.write(header + record["source"])
    return path


def evaluate_seed(seed: Seed):
    from .evaluate import evaluate_source

    return evaluate_source(seed.subject, seed.source, seed.world_size, seed.dtype, key=f"seed:{seed.name}",
                           operator=seed.operator, intent=seed.intent)
