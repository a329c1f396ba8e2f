"""The squeeze stage: distil the expanded model into one standard-size backbone.

After expansion there are T task-specific branches plus reconciliation layers:
T times the cost of a ResNet. Squeeze condenses them into ONE backbone of the
same architecture as a branch (docs/DESIGN.md §1), which is what users take away.

For each source batch of task t the student pays three losses:
    L_task  the source's own loss through its head (heads start as the teacher's);
    L_feat  per distilled stage l: a 1x1 adapter A_{t,l} maps the student's
            feature to branch t's feature space, compared on channel-normalised
            maps ("l2") or by linear CKA ("cka");
    L_kd    cls only: KL between temperature-softened teacher and student logits.
    L = sum_s w_s (lambda_task L_task + lambda_feat L_feat + lambda_kd L_kd)

The student (`SqueezedModel`) is one plain backbone, per-task 1x1 adapters
used only by feature distillation, and copies of the teacher's heads; after
squeezing, model.backbone_state_dict exports its backbone as a plain
torchvision state_dict (docs/DESIGN.md §5): same size and cost as a standard
ResNet. The teacher is frozen (eval mode, no grad, autocast). It is
deliberately NOT a submodule of the `Distiller`: DDP then neither broadcasts
its buffers nor looks for its gradients, and checkpoints hold only the student.
The loop itself is the expansion engine's (engine.py); this file adds only the
student, its initialisation and the loss.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data, dist, engine
from .backbone import _pretrained_state_dict, build_backbone, load_torchvision_state_dict
from .checkpoint import CheckpointError, load_checkpoint, save_atomic
from .config import Config, ModelConfig, SourceConfig, SqueezeConfig, config_from_dict
from .expand import build_train_datasets, compile_stages, images_per_step, make_evaluator
from .model import (MultiSourceModel, XLearnerModel, backbone_state_dict, channels_last, model_from_checkpoint,
                    n_params)


def feature_loss_l2(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Squared distance of channel-wise L2-normalised maps, summed over channels: 2 - 2 cos, in [0, 4]."""
    return (F.normalize(s.float(), dim=1) - F.normalize(t.float(), dim=1)).pow(2).sum(1).mean()


def feature_loss_cka(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """1 - linear CKA between the two maps, treating every pixel of the batch as a sample."""
    x = s.float().permute(0, 2, 3, 1).reshape(-1, s.shape[1])
    y = t.float().permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    x, y = x - x.mean(0), y - y.mean(0)
    cross = (y.T @ x).pow(2).sum()
    return 1 - cross / ((x.T @ x).norm() * (y.T @ y).norm() + 1e-8)


FEATURE_LOSSES = {"l2": feature_loss_l2, "cka": feature_loss_cka}


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, multi_label: bool) -> torch.Tensor:
    """Hinton KD; T^2 keeps the gradient scale independent of the temperature."""
    s, t = student_logits.float() / temperature, teacher_logits.float() / temperature
    if multi_label:  # independent binary distributions per class
        return F.binary_cross_entropy_with_logits(s, torch.sigmoid(t)) * temperature**2
    return F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean") * temperature**2


class SqueezedModel(MultiSourceModel):
    """The squeeze-stage student: one Backbone, per-task 1x1 adapters, and task heads.

    adapters[task][f"layer{l}"] maps the student's stage-l feature to the
    teacher branch's channel count for feature distillation (docs/DESIGN.md §1).
    They start as the identity (channels are equal: same arch), so the
    distillation loss starts by comparing the student with the teacher as they
    are, and a student initialised from a branch (task:<name>) starts at a low
    loss for that task, instead of first having to undo a random projection."""

    def __init__(self, mcfg: ModelConfig, sources: list[SourceConfig], num_classes: dict[str, int],
                 distill_stages=(2, 3, 4)):
        backbone = build_backbone(mcfg.arch, "", mcfg.frozen_bn)  # weights come from the teacher or a checkpoint
        super().__init__(mcfg, sources, num_classes, backbone.channels)
        self.backbone = backbone
        self.distill_stages = [int(l) for l in distill_stages]
        bad = [l for l in self.distill_stages if l not in (1, 2, 3, 4)]
        if bad:
            raise ValueError(f"squeeze.distill_stages: stages are 1..4 (layer1..layer4), got {bad}")
        self.adapters = nn.ModuleDict()
        for t in self.tasks:
            self.adapters[t] = nn.ModuleDict()
            for l in self.distill_stages:
                c = backbone.channels[f"layer{l}"]
                conv = nn.Conv2d(c, c, 1, bias=False)
                with torch.no_grad():
                    conv.weight.copy_(torch.eye(c).view(c, c, 1, 1))
                self.adapters[t][f"layer{l}"] = conv
        channels_last(self, mcfg.channels_last)

    def features(self, x: torch.Tensor, task: str | None = None) -> dict[str, torch.Tensor]:
        return self.backbone(x)  # one backbone for every task

    def exported_backbone(self, branch: str | None) -> nn.Module:
        if branch:
            raise ValueError("a squeezed model has a single backbone; branch applies to expanded checkpoints only")
        return self.backbone

    def report(self, init: str = "") -> str:
        """Build-time report: the one backbone, the adapters (discarded after squeeze), the heads."""
        lines = [f"SqueezedModel: one {self.mcfg.arch}" + (f", init {init}" if init else ""),
                 f"  backbone: {n_params(self.backbone)} params",
                 f"  adapters: {n_params(self.adapters)} params (distillation only, not exported)"]
        lines += self._head_report()
        lines.append(f"  total: {n_params(self)} params")
        return "\n".join(lines)

    def adapt(self, feats: dict[str, torch.Tensor], task: str) -> dict[str, torch.Tensor]:
        """Student features mapped into teacher branch `task`'s space, for the distill stages."""
        return {k: conv(feats[k]) for k, conv in self.adapters[task].items()}

    @classmethod
    def from_expanded(cls, teacher: XLearnerModel, student_init: str = "",
                      distill_stages=(2, 3, 4)) -> "SqueezedModel":
        """A student for `teacher`: heads copied, backbone per `student_init` (`init_student_backbone`)."""
        teacher = getattr(teacher, "module", teacher)  # accept a DDP-wrapped teacher
        model = cls(teacher.mcfg, teacher.source_list, teacher.num_classes, distill_stages)
        model.heads.load_state_dict(teacher.heads.state_dict())
        init_student_backbone(model.backbone, teacher, resolve_student_init(student_init, teacher))
        device = next(teacher.parameters()).device
        return model.to(device)


def resolve_student_init(student_init: str, teacher: XLearnerModel) -> str:
    """`squeeze.student_init` with its default: "" is `task:<first task>`, a copy of the first branch."""
    return student_init or f"task:{teacher.tasks[0]}"


def init_student_backbone(backbone: nn.Module, teacher: XLearnerModel, init: str) -> None:
    """Load the student's starting weights: task:<name> (that branch), mean (of the branches), scratch, or a file."""
    if teacher.mcfg.shared_backbone:
        branches = {t: teacher.backbone for t in teacher.tasks}
    else:
        branches = dict(teacher.backbone.branches.items())
    if init.startswith("task:"):
        name = init[len("task:"):]
        if name not in branches:
            raise ValueError(f"squeeze.student_init={init!r}: no branch {name!r}; branches are {list(branches)}")
        backbone.load_state_dict(branches[name].state_dict())
    elif init == "mean":
        sds = [b.state_dict() for b in branches.values()]
        avg = {}
        for k in sds[0]:
            vals = torch.stack([sd[k] for sd in sds])
            # floats (weights, BN statistics) are averaged; the integer BN step counter takes the max
            avg[k] = vals.mean(0) if vals.is_floating_point() else vals.max(0).values
        backbone.load_state_dict(avg)
    elif init == "scratch":
        pass
    elif Path(init).is_file():
        load_torchvision_state_dict(backbone, _pretrained_state_dict(init), init)
    else:
        raise ValueError(f"squeeze.student_init={init!r}: expected task:<name>, mean, scratch, "
                         f"or the path of a torchvision-format state_dict")


class Distiller(nn.Module):
    """Student + adapters trained against a frozen teacher; forward(batch_by_source) -> dict of losses."""

    def __init__(self, student: SqueezedModel, teacher: XLearnerModel, sources: list[SourceConfig], sq: SqueezeConfig):
        super().__init__()
        self.student = student
        teacher.eval().requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)  # not registered: see the module docstring
        self.sources = sources
        self.sq = sq
        self.feature_loss = FEATURE_LOSSES[sq.distill_loss]

    def _apply(self, fn, *args, **kwargs):
        # .to(device) must move the unregistered teacher too.
        object.__setattr__(self, "teacher", self.teacher._apply(fn, *args, **kwargs))
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher's BN statistics never move
        return self

    def forward(self, batch_by_source: dict) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        for src in self.sources:
            task, name = src.task, src.name
            student = self.student.forward_source(batch_by_source[name], name)
            with torch.no_grad():  # the teacher sees exactly the student's input tensor
                t_feats = self.teacher.features(student.images, task)
                t_logits = self.teacher.heads[task].predict(t_feats, student.ctx, name) if task == "cls" else None
            feat = [self.feature_loss(s, t_feats[k]) for k, s in self.student.adapt(student.feats, task).items()]
            losses[f"{name}/task"] = student.loss
            losses[f"{name}/feat"] = torch.stack(feat).mean()
            if t_logits is not None:
                losses[f"{name}/kd"] = kd_loss(student.outputs, t_logits, self.sq.kd_temperature, src.multi_label)
        return losses

    def total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        lam = {"task": self.sq.lambda_task, "feat": self.sq.lambda_feat, "kd": self.sq.lambda_kd}
        weight = {s.name: s.weight for s in self.sources}
        return sum(weight[k.split("/")[0]] * lam[k.split("/")[1]] * v for k, v in losses.items())


def load_teacher(path: str | Path, cfg: Config) -> tuple[XLearnerModel, dict]:
    """Load an expand checkpoint and check that it can teach the squeeze config's sources."""
    ckpt = load_checkpoint(path)
    meta = ckpt.get("meta", {})
    if meta.get("kind") != "expanded":
        raise CheckpointError(f"{path}: not an expand checkpoint (meta.kind = {meta.get('kind')!r}); "
                              "pass RUN/checkpoint.pt of an `expand` run as --teacher")
    tcfg = config_from_dict(ckpt["config"])
    teacher_sources = {s.name: s for s in tcfg.sources}
    for s in cfg.sources:
        if s.name not in teacher_sources:
            raise CheckpointError(f"{path}: the teacher was not trained on source '{s.name}' "
                                  f"(its sources: {sorted(teacher_sources)}); its head cannot be copied")
        t = teacher_sources[s.name]
        if t.task != s.task:
            raise CheckpointError(f"{path}: source '{s.name}' is task '{t.task}' in the teacher but '{s.task}' here")
        if s.num_classes and s.num_classes != meta["num_classes"][s.name]:
            raise CheckpointError(f"{path}: source '{s.name}' has {meta['num_classes'][s.name]} classes in the "
                                  f"teacher but num_classes = {s.num_classes} here")
    extra = sorted(set(teacher_sources) - {s.name for s in cfg.sources})
    if extra:  # the student copies every teacher head; each needs its source's batches (DDP, no unused params)
        raise CheckpointError(f"{path}: the teacher has sources {extra} that the squeeze config lacks; "
                              "squeeze uses the same [[sources]] as the expand run")
    teacher = model_from_checkpoint(ckpt)
    return teacher, meta


def run(cfg: Config, teacher_path: str | Path) -> Path:
    """Run (or resume) the squeeze stage; returns the path of the exported backbone."""
    device = dist.init_distributed()
    sq = cfg.squeeze
    engine.seed_everything(sq.seed)
    teacher, tmeta = load_teacher(teacher_path, cfg)
    datasets, num_classes = build_train_datasets(cfg.sources)
    for name, k in num_classes.items():
        if k != tmeta["num_classes"][name]:
            raise CheckpointError(f"{teacher_path}: source '{name}' has {tmeta['num_classes'][name]} classes in the "
                                  f"teacher but {k} in the data")
    init = resolve_student_init(sq.student_init, teacher)
    student = SqueezedModel.from_expanded(teacher, init, sq.distill_stages)
    distiller = Distiller(student, teacher, cfg.sources, sq).to(device)
    if cfg.model.compile:  # the student's stages and the frozen teacher's (not a submodule of the distiller)
        compile_stages(student)
        compile_stages(teacher)
    loader = data.MultiSourceLoader(cfg.sources, datasets, rank=dist.get_rank(), world_size=dist.get_world_size(),
                                    seed=sq.seed, workers=sq.workers)
    out = Path(sq.out)

    # The teacher's val metrics, once, so the student can be judged against them.
    teacher_file = out / "teacher_metrics.json"
    if teacher_file.exists():
        teacher_metrics = json.loads(teacher_file.read_text())
    else:
        teacher_metrics = make_evaluator(teacher, cfg.sources, device, sq.amp, sq.workers)(0)
        if dist.is_main_process():
            out.mkdir(parents=True, exist_ok=True)
            teacher_file.write_text(json.dumps(teacher_metrics, indent=2))
    student_eval = make_evaluator(student, cfg.sources, device, sq.amp, sq.workers)
    last = {}

    def evaluate(step: int) -> dict:
        last["step"], last["metrics"] = step, student_eval(step)
        return last["metrics"]

    meta = {"kind": "squeezed", "num_classes": num_classes, "arch": teacher.mcfg.arch, "teacher": str(teacher_path),
            "distill_stages": list(sq.distill_stages), "student_init": init, "tasks": list(teacher.tasks)}
    engine.train(engine.Run(
        model=distiller, loader=loader, tc=sq, config=cfg, device=device, meta=meta, ckpt_module=student,
        evaluate=evaluate, images_per_step=images_per_step(cfg.sources), report=student.report(init), stage="squeeze"))

    backbone_path = out / "backbone.pth"
    if dist.is_main_process():
        save_atomic(backbone_state_dict(student), backbone_path)
        table = {"step": last.get("step"), "student": last.get("metrics", {}), "teacher": teacher_metrics}
        (out / "metrics.json").write_text(json.dumps(table, indent=2))
        dist.log(format_side_by_side(table["student"], teacher_metrics))
        dist.log(f"[squeeze] exported the student backbone to {backbone_path}")
    dist.barrier()
    return backbone_path


def format_side_by_side(student: dict, teacher: dict) -> str:
    lines = ["| source | metric | teacher | student | student/teacher |", "|---|---|---|---|---|"]
    for name, tm in teacher.items():
        for k, tv in tm.items():
            sv = student.get(name, {}).get(k)
            if isinstance(tv, float) and isinstance(sv, float):
                ratio = f"{sv / tv:.2f}" if tv else "n/a"
                lines.append(f"| {name} | {k} | {tv:.2f} | {sv:.2f} | {ratio} |")
    return "\n".join(lines)
