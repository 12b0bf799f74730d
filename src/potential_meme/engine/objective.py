"""What the student minimizes: chunked logit KD, plus hidden-state matching for layerwise runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..spec.models import KnowledgeMethod, LayerwiseMethod
from .losses import chunked_kd_loss


def hidden_states(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Final (normed) hidden states [B, L, H], without computing the lm-head."""
    return decoder(model)(input_ids=input_ids, use_cache=False).last_hidden_state


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack under the lm-head, also of a model wrapped with LoRA adapters (peft)."""
    unwrapped = model.get_base_model() if hasattr(model, "get_base_model") else model
    return unwrapped.base_model


class HiddenStateTap:
    """Keeps the hidden states at chosen layer indices during a forward, through hooks (no second pass).

    Index 0 is the embedding output, index i the output of decoder layer i (1-based).
    """

    def __init__(self, model: nn.Module, indices: list[int]):
        base = decoder(model)
        self.states: dict[int, torch.Tensor] = {}
        self.handles = []
        for index in sorted(set(indices)):
            module = base.embed_tokens if index == 0 else base.layers[index - 1]
            self.handles.append(module.register_forward_hook(self._keeper(index)))

    def _keeper(self, index: int):
        def keep(module, args, output):
            self.states[index] = output[0] if isinstance(output, tuple) else output

        return keep

    def take(self) -> dict[int, torch.Tensor]:
        states, self.states = self.states, {}
        return states

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-pair loss; mse is relative to the teacher's mean square, so deep layers with large
    residual norms do not drown shallow ones."""
    student, teacher = student.float(), teacher.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
    return F.mse_loss(student, teacher) / teacher.pow(2).mean().clamp_min(1e-6)


class DistillationObjective(nn.Module):
    """Student forward + losses in one module, so DDP sees every parameter it uses (projections too)."""

    def __init__(
        self, student: nn.Module, method: KnowledgeMethod, teacher_hidden_size: int, compile_loss: bool = False
    ):
        super().__init__()
        self.student = student
        self.method = method
        self.compile_loss = compile_loss
        self.tap = None
        self.projections = nn.ModuleList()
        if isinstance(method, LayerwiseMethod):
            self.tap = HiddenStateTap(student, method.student_layers)
            width = student.config.hidden_size
            for _ in method.student_layers:
                # Identity where widths match: the student state is compared as it is.
                self.projections.append(
                    nn.Identity() if width == teacher_hidden_size else nn.Linear(width, teacher_hidden_size, bias=False)
                )

    def forward(
        self, input_ids, labels, teacher_hidden, teacher_weight, teacher_states=None, alpha=None, teacher_targets=None
    ):
        """`alpha`: the method's unless given (0 for text the student wrote: the teacher alone scores it).
        `teacher_targets`: a teacher cache's, instead of `teacher_hidden` and `teacher_weight`."""
        hidden = hidden_states(self.student, input_ids)
        loss, ce, kd = chunked_kd_loss(
            hidden.reshape(-1, hidden.shape[-1]),
            self.student.get_output_embeddings().weight,
            None if teacher_hidden is None else teacher_hidden.reshape(-1, teacher_hidden.shape[-1]),
            teacher_weight,
            labels.reshape(-1),
            alpha=self.method.alpha if alpha is None else alpha,
            temperature=self.method.temperature,
            divergence=self.method.divergence,
            beta=self.method.beta,
            chunk_size=self.method.chunk_size,
            teacher_targets=teacher_targets,
            compiled=self.compile_loss,
        )
        layer_loss = torch.zeros((), device=loss.device)
        if self.tap is not None:
            student_states = self.tap.take()
            method: LayerwiseMethod = self.method
            for projection, weight, s_index, t_index in zip(
                self.projections, method.pair_weights, method.student_layers, method.teacher_layers, strict=True
            ):
                if weight:
                    pair = hidden_state_loss(
                        projection(student_states[s_index]), teacher_states[t_index], method.layer_loss
                    )
                    layer_loss = layer_loss + weight * pair
            loss = loss + layer_loss
        return loss, ce, kd, layer_loss.detach()
