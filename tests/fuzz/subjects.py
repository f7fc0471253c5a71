"""Fuzzing subjects: a program family whose distributed part the mutators rewrite.

A `Subject` is a module source (a built-in example's file, specialized to its correct program, or a
hand-written program from ``programs/``), the names of its distributed definitions, how to build a
`gg.Problem` from a loaded copy of the module, the configurations (world size, dtype) to try, and
the integer input domain ground truth may draw from.
"""

from __future__ import annotations

import ast
import functools
import glob
import inspect
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import mutators

_PROGRAMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "programs")


@dataclass(frozen=True)
class Subject:
    name: str
    source: str  # the (specialized) correct module source
    package: str | None  # package for relative imports
    mutable: tuple[str, ...]
    build: Callable  # (module, world_size, dtype) -> Problem
    configs: tuple[tuple[int, str], ...]
    int_domain: str = "ids"  # "ids" | "targets" (targets may be -100, the ignore sentinel)
    gt_inputs: int = 5  # how many input draws ground truth uses (fewer for slow subjects)
    notes: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)
    baseline_only: bool = False  # the unmutated program is itself a finding: mutating it adds only noise
    # ground truth on real gloo processes only: LocalTensorMode does not simulate process groups other than
    # the world (dist.new_group / new_subgroups / DeviceMesh sub-groups, dist.get_rank(group))
    gloo_only: bool = False

    @functools.cached_property
    def tree(self) -> ast.Module:
        return ast.parse(self.source)


# ---------------------------------------------------------------------------------- built-in examples

# example name -> (module, make attribute, distributed definitions, sizes, configs, gt input draws)
_EXAMPLE_SPECS = {
    "mlp": ("mlp", "make", ("mlp_tp",), dict(batch=2, seq=2, hidden=8, ffn=16),
            ((2, "float64"), (4, "float64"), (2, "float32"), (2, "bfloat16")), 5),
    "attention": ("attention", "make", ("attention_tp",), dict(batch=1, seq=4, hidden=8, heads=4),
                  ((2, "float64"), (4, "float64"), (2, "float32")), 5),
    "attention_fused_qkv": ("attention_fused_qkv", "make", ("fused_qkv_attention_tp",),
                            dict(batch=1, seq=4, hidden=8, heads=4), ((2, "float64"), (4, "float64")), 5),
    "vocab_embedding": ("vocab_embedding", "make", ("vocab_parallel_embedding",),
                        dict(batch=2, seq=4, vocab=16, hidden=4), ((2, "float64"), (4, "float64"), (2, "float32")), 5),
    "vocab_cross_entropy": ("vocab_cross_entropy", "make",
                            ("_VocabParallelCrossEntropy", "vocab_parallel_cross_entropy", "cross_entropy_tp"),
                            dict(batch=2, seq=4, vocab=16), ((2, "float64"), (4, "float64"), (2, "float32")), 5),
    "sp_layernorm_mlp": ("sp_layernorm_mlp", "make", ("sp_layernorm_mlp",), dict(batch=1, seq=4, hidden=8, ffn=16),
                         ((2, "float64"), (4, "float64"), (2, "float32")), 5),
    "gpt_block": ("gpt_block", "make", ("parallel_attention", "parallel_mlp", "gpt_block_tp"),
                  dict(batch=1, seq=2, hidden=8, heads=4, ffn=16), ((2, "float64"), (4, "float64")), 4),
    "gpt_block_fwd_bwd": ("gpt_block", "make_fwd_bwd",
                          ("parallel_attention", "parallel_mlp", "gpt_block_tp", "gpt_block_fwd_bwd_tp"),
                          dict(batch=1, seq=2, hidden=8, heads=4, ffn=16), ((2, "float64"),), 3),
    "gpt_block_sp": ("gpt_block", "make", ("_enter_tensor_parallel_region", "_leave_tensor_parallel_region",
                                           "parallel_attention", "parallel_mlp", "gpt_block_tp"),
                     dict(batch=1, seq=8, hidden=8, heads=4, ffn=16, sequence_parallel=True),
                     ((2, "float64"), (4, "float64")), 4),
    "gpt_block_sp_fwd_bwd": ("gpt_block", "make_fwd_bwd",
                             ("_enter_tensor_parallel_region", "_leave_tensor_parallel_region",
                              "parallel_attention", "parallel_mlp", "gpt_block_tp", "gpt_block_fwd_bwd_tp",
                              "allreduce_sequence_parallel_grads"),
                             dict(batch=1, seq=4, hidden=8, heads=2, ffn=16, sequence_parallel=True),
                             ((2, "float64"),), 3),
    "gpt": ("gpt", "make", ("gpt_loss_tp",), dict(layers=1, hidden=8, heads=4, vocab=16, seq=2, batch=1),
            ((2, "float64"),), 3),
    "gpt_fwd_bwd": ("gpt", "make", ("gpt_loss_tp", "gpt_fwd_bwd_tp"),
                    dict(layers=1, hidden=8, heads=4, vocab=16, seq=2, batch=1, backward=True), ((2, "float64"),), 3),
    "pipeline_gpipe": ("pipeline", "make_gpipe", ("_forward", "_backward", "gpipe"), dict(batch=4, hidden=4),
                       ((2, "float64"), (4, "float64")), 3),
    "pipeline_1f1b": ("pipeline", "make_1f1b", ("one_f_one_b",), dict(batch=8, hidden=4), ((2, "float64"),), 3),
    "zero_adam": ("zero", "make", ("zero2_step", "adam"), dict(batch=4, d=2, h=3), ((2, "float64"), (4, "float64")), 3),
    "bounds_ibp_fsdp": ("bounds", "make_ibp_fsdp", ("ibp_fsdp", "gather"), dict(batch=2, d=2, hidden=4, out=4),
                        ((2, "float64"), (4, "float64"), (2, "float32")), 4),
    "bounds_crown_fsdp": ("bounds", "make_crown_fsdp", ("crown_fsdp", "gather"), dict(batch=2, d=2, hidden=4, out=4),
                          ((2, "float64"), (4, "float64"), (2, "float32")), 4),
    "bounds_ibp_tp": ("bounds", "make_ibp_tp", ("ibp_tp",), dict(batch=2, d=2, hidden=4, out=2),
                      ((2, "float64"), (4, "float64"), (2, "float32")), 4),
    "bounds_crown_tp": ("bounds", "make_crown_tp", ("crown_tp",), dict(batch=2, d=2, hidden=4, out=2),
                        ((2, "float64"), (4, "float64"), (2, "float32")), 4),
    "ring_attention": ("context", "make_ring", ("_ring_exchange", "_block", "_merge", "ring_attention"),
                       dict(heads=2, seq=8), ((2, "float64"), (4, "float64")), 3),
    "ring_attention_causal": ("context", "make_ring_causal", ("_ring_exchange", "ring_attention_flash"),
                              dict(heads=2, seq=8), ((2, "float64"), (4, "float64")), 3),
    "allgather_kv_attention": ("context", "make_allgather", ("_all_gather_seq", "allgather_kv_attention"),
                               dict(heads=2, seq=8), ((2, "float64"), (4, "float64"), (2, "float32")), 3),
    "allgather_kv_attention_fwd_bwd": ("context", "make_allgather_fwd_bwd", ("allgather_kv_attention_fwd_bwd",),
                                       dict(heads=2, seq=8), ((2, "float64"),), 4),
    "zigzag_attention": ("context", "make_zigzag", ("_unzigzag", "zigzag_attention"), dict(heads=2, seq=8),
                         ((2, "float64"), (4, "float64")), 3),
    "ulysses_attention": ("context", "make_ulysses", ("_all_to_all", "ulysses_attention"), dict(heads=4, seq=8),
                          ((2, "float64"), (4, "float64")), 3),
    "moe_capacity": ("experts", "make_capacity", ("moe_capacity_ep", "reduce_balance_terms"),
                     dict(groups=8, seq=2, d=2, h=3, experts=8, capacity=1), ((2, "float64"), (4, "float64")), 3),
    "moe_dropless": ("experts", "make_dropless", ("moe_dropless_ep",), dict(tokens=8, d=2, h=3, experts=4),
                     ((2, "float64"), (4, "float64")), 3),
    "ddp_adamw": ("data_parallel", "make_ddp_adamw", ("ddp_step", "_local_grads", "_all_reduce_grads"),
                  dict(batch=8, d=2, h=4), ((2, "float64"), (4, "float64")), 3),
    "ddp_sgd_clip": ("data_parallel", "make_ddp_sgd_clip", ("ddp_step", "_all_reduce_grads", "_clip_replicated"),
                     dict(batch=4, d=2, h=4), ((2, "float64"),), 3),
    "zero1_adamw": ("data_parallel", "make_zero1_adamw", ("zero1_step", "_rows", "_clip_replicated"),
                    dict(batch=4, d=4, h=4), ((2, "float64"), (4, "float64")), 3),
    "fsdp_adamw": ("data_parallel", "make_fsdp_adamw", ("fsdp_step", "_GatheredMatmul", "_all_gather_rows"),
                   dict(batch=4, d=4, h=4), ((2, "float64"), (4, "float64")), 3),
    "fsdp_clip": ("data_parallel", "make_fsdp_clip", ("fsdp_step", "_clip_sharded"), dict(batch=4, d=4, h=4),
                  ((2, "float64"),), 3),
    "mesh_tp_dp": ("mesh", "make_tp_dp", ("tp_dp_step", "mesh_groups"), dict(vocab=8, hidden=2, ffn=4),
                   ((4, "float64"),), 5),
    "mesh_dp_cp": ("mesh", "make_dp_cp", ("cp_attention", "mesh_groups"), dict(dim=2), ((4, "float64"),), 5),
    "mesh_tp_pp": ("mesh", "make_tp_pp", ("tp_pp_step", "_gpipe_tp", "_tp_block", "_send_scattered", "_recv_gathered"),
                   dict(batch=4, hidden=4, ffn=4), ((4, "float64"),), 4),
    "mesh_dp_pp_tp": ("mesh", "make_dp_pp_tp", ("dp_pp_tp_step", "mesh3_groups", "_gpipe_tp", "_tp_block",
                                                "_send_scattered", "_recv_gathered"),
                      dict(batch=8, hidden=4, ffn=4), ((8, "float64"),), 3),
    "dtensor_sp_mlp": ("dtensor", "make_sp_mlp", ("sp_mlp_dtensor",), dict(batch=2, seq=4, hidden=4, ffn=8),
                       ((2, "float64"), (4, "float64")), 4),
    "dtensor_tp_dp_train": ("dtensor", "make_tp_dp_train", ("tp_dp_train_dtensor",), dict(batch=4, hidden=4, ffn=8),
                            ((4, "float64"),), 4),
}


# examples whose programs use sub-groups of the world (ground truth on gloo only)
_GLOO_ONLY = {"mesh_tp_dp", "mesh_dp_cp", "mesh_tp_pp", "mesh_dp_pp_tp", "dtensor_sp_mlp", "dtensor_tp_dp_train"}


def _without_domains(build):
    def without(module, world_size, dtype):
        problem = build(module, world_size, dtype)
        problem.domains = {}
        return problem
    return without


def _example_builder(make_attr: str, sizes: dict):
    def build(module, world_size, dtype):
        return getattr(module, make_attr)(world_size=world_size, dtype=dtype, **sizes)
    return build


def example_subjects() -> list[Subject]:
    import importlib

    out = []
    for name, (mod, make_attr, mutable, sizes, configs, n_inputs) in _EXAMPLE_SPECS.items():
        m = importlib.import_module(f"gg_notebook.examples.{mod}")
        tree = mutators.specialize_bug(ast.parse(inspect.getsource(m)), mutable)
        source = ast.unparse(tree) + "\n"
        out.append(Subject(f"example:{name}", source, "gg_notebook.examples", mutable,
                           _example_builder(make_attr, sizes), configs, "ids", n_inputs, tags=("example",),
                           gloo_only=name in _GLOO_ONLY))
    # The built-in vocab-parallel cross-entropy on targets that include the ignore sentinel -100:
    # its sequential spec (F.cross_entropy) gives 0 there, Megatron's distributed code does not.
    # The example declares its targets as class ids (domains=...); this subject drops that declaration.
    ce = next(s for s in out if s.name == "example:vocab_cross_entropy")
    out.append(Subject("example:vocab_cross_entropy@ignore_index", ce.source, ce.package, ce.mutable,
                       _without_domains(ce.build),
                       ((2, "float64"),), "targets", 5, notes="targets include -100", tags=("example",),
                       baseline_only=True))
    return out


# ------------------------------------------------------------------------------ hand-written programs


def _program_builder(module, world_size, dtype):
    return module.make(world_size=world_size, dtype=dtype)


def program_subjects() -> list[Subject]:
    out = []
    for path in sorted(glob.glob(os.path.join(_PROGRAMS, "*.py"))):
        stem = os.path.basename(path)[:-3]
        if stem.startswith("_"):
            continue
        with open(path) as f:
            source = f.read()
        consts = _module_constants(source)
        out.append(Subject(f"program:{stem}", source, None, tuple(consts["MUTABLE"]), _program_builder,
                           tuple(tuple(c) for c in consts["CONFIGS"]), consts.get("INT_DOMAIN", "ids"), 5,
                           tags=("program",), baseline_only=bool(consts.get("BASELINE_ONLY", False))))
    return out


def _module_constants(source: str) -> dict:
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id.isupper():
                try:
                    out[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:
                    pass
    return out


@functools.lru_cache(maxsize=1)
def all_subjects() -> dict[str, Subject]:
    return {s.name: s for s in example_subjects() + program_subjects()}


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)
