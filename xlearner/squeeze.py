"""The squeeze stage: distil the expanded model into one standard-size backbone.

After expansion there are T task-specific branches plus reconciliation layers:
T times the cost of a ResNet. Squeeze condenses them into ONE backbone of the
same architecture as a branch (DESIGN.md §1), which is what users take away.

For each source batch of task t the student pays three losses:
    L_task  the source's own loss through its head (heads start as the teacher's);
    L_feat  per distilled stage l: a 1x1 adapter A_{t,l} maps the student's
            feature to branch t's feature space, compared on channel-normalised
            maps ("l2") or by linear CKA ("cka");
    L_kd    cls only: KL between temperature-softened teacher and student logits.
    L = sum_s w_s (lambda_task L_task + lambda_feat L_feat + lambda_kd L_kd)

The teacher is frozen (eval mode, no grad, autocast). It is deliberately NOT a
submodule of the `Distiller`: DDP then neither broadcasts its buffers nor
looks for its gradients, and checkpoints hold only the student.
The loop itself is the expansion engine's (engine.py); this file adds only the
model and the loss.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import data, dist, engine
from .checkpoint import CheckpointError, load_checkpoint, save_atomic
from .config import Config, SourceConfig, SqueezeConfig, config_from_dict
from .expand import build_train_datasets, compile_stages, images_per_step, make_evaluator
from .model import SqueezedModel, XLearnerModel, backbone_state_dict, model_from_checkpoint


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
            head = self.student.heads[task]
            x, ctx = head.prepare(batch_by_source[name], name)
            x = self.student._images(x)  # channels_last when configured
            feats = self.student.backbone(x)
            task_loss, logits = head.loss(feats, ctx, name)
            with torch.no_grad():
                t_feats = self.teacher.features(x, task)
                t_logits = self.teacher.heads[task].predict(t_feats, ctx, name) if task == "cls" else None
            adapters = self.student.adapters[task]
            feat = [self.feature_loss(adapters[f"layer{l}"](feats[f"layer{l}"]), t_feats[f"layer{l}"])
                    for l in self.sq.distill_stages]
            losses[f"{name}/task"] = task_loss
            losses[f"{name}/feat"] = torch.stack(feat).mean()
            if t_logits is not None:
                losses[f"{name}/kd"] = kd_loss(logits, t_logits, self.sq.kd_temperature, src.multi_label)
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
    init = sq.student_init or f"task:{teacher.tasks[0]}"
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
