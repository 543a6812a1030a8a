"""ZeRO stage 1/2 under a ds_ext reducer (``ZeroBridge``) and ZeRO partitioned within a node (``NodeMPU``,
``node_mpu``): the parts of the attachment that reach into DeepSpeed's ZeRO optimizer, pinned to the DeepSpeed
releases in ``ZERO_BRIDGE_DEEPSPEED``."""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Optional

import torch

from ..comm import Communicator
from .step_hooks import StepHook, StepInfo

log = logging.getLogger(__name__)


#: the DeepSpeed releases whose ZeRO stage 1/2 optimizer ``ZeroBridge`` was written against: [from, to)
ZERO_BRIDGE_DEEPSPEED = ((0, 19), (0, 20))


def _deepspeed_version() -> str:
    import deepspeed

    return str(getattr(deepspeed, "__version__", "unknown"))


def zero_bridge_version_problem(version: str) -> Optional[str]:
    """Why ``ZeroBridge`` cannot be trusted with this DeepSpeed version, or None."""
    lo, hi = ZERO_BRIDGE_DEEPSPEED
    try:
        major_minor = tuple(int(x) for x in version.split("+")[0].split(".")[:2])
    except ValueError:
        major_minor = None
    if major_minor is not None and lo <= major_minor < hi:
        return None
    return (f"a replacing reducer under ZeRO stage 1/2 reaches into DeepSpeed's ZeRO optimizer, written against "
            f"deepspeed>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}; this is deepspeed {version}. Install a supported "
            f"DeepSpeed (pip install 'deepspeed>={lo[0]}.{lo[1]},<{hi[0]}.{hi[1]}'), or use ZeRO stage 0 or "
            f"reducer 'deepspeed'")


class ZeroBridge(StepHook):
    """Step hook: ZeRO stage 1 and 2 under a replacing reducer (every method but ``deepspeed``).

    DeepSpeed's ZeRO-1/2 optimizer (``DeepSpeedZeroOptimizer``) reduces gradients itself, from gradient
    hooks registered on every parameter, into the partition each rank owns. Here the method's exchange
    takes that job: the ZeRO optimizer's gradient hooks are removed (so nothing reduces, partitions or
    frees a gradient during backward; ``p.grad`` accumulates over the micro-batches as at stage 0), the
    reducer's ``finish()`` writes the whole averaged gradient into every ``p.grad`` as at stage 0, and
    ``fill()`` then hands ZeRO this rank's partition of it (``averaged_gradients``), which is what ZeRO's
    ``step()`` consumes: it clips, steps its fp32 partition of the optimizer state, and all-gathers the
    updated parameter partitions (counted by ``record()`` as kind ``zero_allgather``). No uncompressed
    gradient collective is left on the wire. The optimizer state stays partitioned; the gradients are
    whole on every rank (a compressor needs the whole local gradient), so stage 2 saves no gradient
    memory over stage 1 here. ZeRO's separate accumulation attribute (fp16 at stage 1) is switched off:
    gradients accumulate in ``p.grad`` in the parameters' dtype, as at stage 0. The reducer must average
    over ZeRO's data-parallel group (checked); MoE expert groups, ZenFlow and unmanaged gradient
    accumulation are refused. ``restore()`` (``Attachment.detach``) puts ZeRO's hooks back.

    **Node-partitioned** (hierarchical mode, ``hierarchical: true`` with ZeRO 1/2 through ``initialize``, or an
    own ``deepspeed.initialize(..., mpu=node_mpu())``): ZeRO's data-parallel group is this rank's node, so the
    optimizer state is partitioned over the node's ranks (each node holds one full copy) and ZeRO's parameter
    all-gather stays inside the node (metered as ``node_zero_allgather``, which ``hierarchy.intra_node_bytes``
    counts). This is sound because the hierarchical reducer hands every rank of every node the same averaged
    gradient, so every node steps the same partitions to the same values. DeepSpeed's checkpoint files are
    named by the rank within the node, so only the first node writes them (the others' save flags are off
    while attached) and every node loads them; the checkpoint directory must be shared by the nodes, as
    DeepSpeed's multi-node checkpoints already need. ZeRO's own reduction would average over one node only,
    so a node-partitioned engine cannot train without the attachment: after ``detach`` its ``step`` raises.

    Written against DeepSpeed 0.19's ``stage_1_and_2.py`` (``ZERO_BRIDGE_DEEPSPEED``, checked here):
    ``_grad_acc_hooks``, ``use_grad_accum_attribute``, ``bit16_groups`` / ``bit16_groups_flat`` (every
    parameter's data is a view into its group's flat buffer), ``partition_size``, ``real_dp_process_group``,
    ``averaged_gradients``, ``single_partition_of_fp32_groups``, ``overflow``."""

    _NEEDS = ("_grad_acc_hooks", "use_grad_accum_attribute", "bit16_groups", "bit16_groups_flat", "partition_size",
              "averaged_gradients", "single_partition_of_fp32_groups", "real_dp_process_group", "cpu_offload")

    def __init__(self, engine, comm: Communicator, replace: bool = True, topology=None):
        """``replace=False`` (reducer ``deepspeed``): ZeRO keeps its own reduction; only ``record()`` is used.
        ``topology`` (a hierarchical reducer's ``topology.Topology``): ZeRO's group may also be this rank's
        node (``node_mpu``), which makes the bridge node-partitioned (class docstring)."""
        self.engine, self.opt, self.comm, self.replace = engine, engine.optimizer, comm, replace
        self.node_partitioned, self.kind, self._save_flags = False, "zero_allgather", None
        flats = getattr(self.opt, "bit16_groups_flat", None) or []
        self.allgather_bytes = sum(int(size) * flat.element_size()
                                   for size, flat in zip(getattr(self.opt, "partition_size", []), flats))
        if not replace:
            import torch.distributed as dist

            groups = getattr(self.opt, "real_dp_process_group", None) or []
            if comm.distributed and any(dist.get_world_size(group=pg) != comm.world_size for pg in groups):
                raise ValueError("reducer 'deepspeed' averages over ZeRO's data-parallel group, which here is not "
                                 f"every rank ({dist.get_world_size(group=groups[0])} of {comm.world_size}, e.g. one "
                                 "node: ds_ext.deepspeed.zero.node_mpu); nodes would drift apart. Use a ds_ext reducer "
                                 "with hierarchical: true, or build the engine without that mpu")
            return
        version = _deepspeed_version()
        problem = zero_bridge_version_problem(version)
        if problem:
            raise ValueError(problem)
        opt = engine.optimizer
        missing = [a for a in self._NEEDS if not hasattr(opt, a)]
        if missing:
            raise ValueError(f"ZeRO stage {engine.zero_optimization_stage()}: DeepSpeed {version}'s ZeRO optimizer "
                             f"({type(opt).__name__}) lacks {', '.join(missing)}, which the replacing reducer needs; "
                             "use ZeRO stage 0 or reducer 'deepspeed'")
        if opt.cpu_offload:
            raise ValueError("ZeRO-Offload (zero_optimization.offload_optimizer) is not supported with a replacing "
                             "reducer: remove it, or use reducer 'deepspeed'")
        unsupported = [what for what, on in (
            ("MoE expert parameter groups", getattr(opt, "has_moe_layers", False)),
            ("ZenFlow", getattr(opt, "zenflow", False)),
            ("managed_gradient_accumulation=false",
             not getattr(engine, "managed_gradient_accumulation", lambda: True)()),
        ) if on]
        if unsupported:
            raise ValueError(f"ZeRO stage {engine.zero_optimization_stage()} with a replacing reducer does not support "
                             f"{', '.join(unsupported)}; use reducer 'deepspeed'")
        import torch.distributed as dist

        node = None
        if topology is not None and topology.n_nodes > 1 and topology.local_size > 1:
            node = [dist.get_global_rank(comm.group, r) if comm.group is not None else r
                    for r in topology.node_members()]
        for i, pg in enumerate(opt.real_dp_process_group):
            size, rank = dist.get_world_size(group=pg), dist.get_rank(group=pg)
            if (size, rank) == (comm.world_size, comm.rank):
                continue
            if node is not None and list(dist.get_process_group_ranks(pg)) == node:
                self.node_partitioned = True
                continue
            within = (f" or this rank's node (ranks {node[0]}-{node[-1]}, ds_ext.deepspeed.zero.node_mpu)"
                      if node is not None else "")
            raise ValueError(f"ZeRO's data-parallel group of parameter group {i} (rank {rank} of {size}) is not "
                             f"the reducer's (rank {comm.rank} of {comm.world_size}){within}: attach over ZeRO's "
                             f"data-parallel group")
        if self.node_partitioned:
            if any(list(dist.get_process_group_ranks(pg)) != node for pg in opt.real_dp_process_group):
                raise ValueError("ZeRO's parameter groups are partitioned over different groups (some over the "
                                 "node, some not); build the engine with one data-parallel group")
            self.kind = "node_zero_allgather"
            # every node holds the same partitions (identical gradients, identical steps): only the first
            # node writes DeepSpeed's checkpoint files, whose names count ranks within the node and would
            # otherwise be written by every node at once; every node reads them back on load
            self._save_flags = (engine.save_non_zero_checkpoint, engine.save_zero_checkpoint)
            if topology.node > 0:
                engine.save_non_zero_checkpoint = engine.save_zero_checkpoint = False
        self._had_hooks = bool(opt._grad_acc_hooks)
        self._accum_attribute = opt.use_grad_accum_attribute
        for h in opt._grad_acc_hooks:
            h.remove()
        opt._grad_acc_hooks = []
        opt.use_grad_accum_attribute = False
        # where this rank's partition of each group lies: (param, first element in it, first element in the
        # partition, count), from the parameters' offsets in the group's flat buffer
        self.segments = []
        for i, flat in enumerate(opt.bit16_groups_flat):
            size = int(opt.partition_size[i])
            start = dist.get_rank(group=opt.real_dp_process_group[i]) * size
            segs = []
            for p in opt.bit16_groups[i]:
                if p.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr():
                    raise ValueError(f"ZeRO group {i}: a parameter is not a view into ZeRO's flat buffer (DeepSpeed "
                                     f"{version}); use ZeRO stage 0 or reducer 'deepspeed'")
                off = (p.data_ptr() - flat.data_ptr()) // flat.element_size()
                lo, hi = max(off, start), min(off + p.numel(), start + size)
                if lo < hi:
                    segs.append((p, lo - off, lo - start, hi - lo))
            self.segments.append((size, segs))

    def wrap(self, step: Callable, info: StepInfo) -> Callable:
        """A replacing reducer: ZeRO's step reads this rank's partition of the reduced gradients (``fill``,
        inside the step: on a skipped fp16 step after the guard's inf is written)."""
        if not self.replace:
            return step

        def filled(*args, **kwargs):
            self.fill()
            return step(*args, **kwargs)

        return filled

    def after_step(self, info: StepInfo) -> None:
        self.record(self.comm.meter)

    def fill(self) -> None:
        """After the reducer's ``finish()``, before ZeRO's ``step()``: this rank's partition of the averaged
        gradients, one flat buffer per group, in the fp32 partition's dtype (padding stays zero)."""
        opt = self.opt
        for i, (size, segs) in enumerate(self.segments):
            part = torch.zeros(size, dtype=opt.single_partition_of_fp32_groups[i].dtype, device=self.comm.device)
            dst = [part.narrow(0, d, n) for p, _, d, n in segs if p.grad is not None]
            src = [p.grad.reshape(-1).narrow(0, s, n) for p, s, _, n in segs if p.grad is not None]
            if dst:  # one fused copy per group, not one per parameter segment (issue 27 N9)
                torch._foreach_copy_(dst, src)
            opt.averaged_gradients[i] = [part]

    def restore(self, keep_node_state: bool = True) -> None:
        """Give ZeRO back its own gradient reduction (``Attachment.detach``). Node-partitioned, there is none
        to give back: ZeRO's own reduction would average over one node only, so its hooks stay removed,
        only the first node keeps writing DeepSpeed's checkpoint files, and ``Attachment.detach`` makes the
        engine's ``step`` refuse to run (``keep_node_state=False``: an attach that failed puts the flags back)."""
        if self.node_partitioned and keep_node_state:  # still partitioned within nodes: the flags stay off
            return
        if self._save_flags is not None:
            self.engine.save_non_zero_checkpoint, self.engine.save_zero_checkpoint = self._save_flags
        if self.replace and not self.opt._grad_acc_hooks:
            self.opt.use_grad_accum_attribute = self._accum_attribute
            if self._had_hooks:
                self.opt.create_gradient_handling_hooks()

    def record(self, meter) -> None:
        """ZeRO's all-gather of the updated parameter partitions (skipped by DeepSpeed on an overflow step):
        the partition this rank sends, as the meter counts an all_gather."""
        if meter is not None and self.comm.distributed and not getattr(self.opt, "overflow", False):
            meter.add(self.kind, self.allgather_bytes)

def _node_partitioned_detached(*args, **kwargs):
    raise RuntimeError("this engine's ZeRO optimizer is partitioned within a node (hierarchical mode): without "
                       "the ds_ext attachment its own gradient reduction would average over one node only; "
                       "attach the hierarchical reducer again or build a new engine")

class NodeMPU:
    """The ``mpu`` object ``deepspeed.initialize(mpu=...)`` takes, describing no model parallelism and one
    node's ranks as the data-parallel group: ZeRO 1/2 then partitions its optimizer state within the node
    (``ZeroBridge``, node-partitioned). DeepSpeed's batch arithmetic counts the data-parallel ranks, so a
    config built for it gives ``train_batch_size`` = micro-batch x accumulation x ranks per node
    (``deepspeed_config(..., data_parallel=...)``); the run's global batch is still that times the nodes."""

    def __init__(self, topology, group):
        self.topology, self.group = topology, group

    def get_data_parallel_group(self):
        return self.group

    def get_data_parallel_world_size(self) -> int:
        return self.topology.local_size

    def get_data_parallel_rank(self) -> int:
        return self.topology.local_rank

    def get_data_parallel_group_ranks(self):
        return self.topology.node_members()

    def get_model_parallel_group(self):
        return None  # no model parallelism (DeepSpeed skips collectives over a None group)

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


def node_mpu(comm: Optional[Communicator] = None) -> Optional[NodeMPU]:
    """Collective (every rank, before ``deepspeed.initialize``): a ``NodeMPU`` over this rank's node, from
    the launcher's ``LOCAL_RANK`` / ``LOCAL_SIZE`` (``topology.Topology.from_env``, checked on every rank).
    None where node partitioning means nothing: one node (ZeRO's default group is the node already) or one
    rank per node (no partition at all; ZeRO then partitions over every rank, as without hierarchical mode).
    For an own loop: ``deepspeed.initialize(..., mpu=node_mpu(), config=cfg)`` with ``cfg``'s
    ``train_batch_size`` counting one node's ranks, then ``ds_ext.attach`` with ``hierarchical: true``. Two
    things DeepSpeed then does per node only: it broadcasts the initial parameters inside each node (attach
    checks that every node starts alike; seed the model alike on every rank), and the sampler of its
    ``training_data=`` loader splits the data over one node's ranks (every node would read the same shard:
    build your own loader over all ranks, as the ds_ext trainer does)."""
    from ..topology import Topology

    comm = comm or Communicator()
    topo = Topology.from_env(comm)
    if topo.n_nodes == 1 or topo.local_size == 1:
        log.info("hierarchical ZeRO: %s, so ZeRO partitions over all %d ranks", "one node" if topo.n_nodes == 1
                 else "one rank per node", topo.world)
        return None
    log.info("hierarchical ZeRO: the optimizer state is partitioned within each node (%d ranks), one copy per "
             "node (%d nodes); ZeRO's parameter all-gather stays inside the node", topo.local_size, topo.n_nodes)
    # collective, same order; pinned: attach's node_communicators finds these, no second NCCL communicator
    groups = [comm.subgroup(topo.node_members(k), pin=True) for k in range(topo.n_nodes)]
    return NodeMPU(topo, groups[topo.node].group)


@contextlib.contextmanager
def _scoped_mpu():
    """``deepspeed.initialize(mpu=...)`` stores the mpu in ``deepspeed.utils.groups``, a process-wide
    registry every later engine would read; the engine keeps its groups in attributes, so the registry is
    put back as it was once the engine is built."""
    from deepspeed.utils import groups

    before = groups.mpu
    try:
        yield
    finally:
        groups.mpu = before
