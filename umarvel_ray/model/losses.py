"""Contrastive and distillation losses for the U-MARVEL training chain.

Data-parallel semantics (why there are two loss values):

* Every worker all-gathers queries, positives and hard negatives, puts its own tensor (the one that
  carries gradients) back in its slot (Tevatron style) and computes the *full global* logits matrix.
  `LossOutput.loss` is therefore the exact loss of a single process holding the concatenated batch,
  identical on every rank: log it.
* Each rank's autograd graph only reaches its own shard, and DeepSpeed/DDP *average* gradients over
  ranks. `LossOutput.backward_loss = world_size * loss` undoes that averaging for the embedding path,
  while tau (whose gradient every rank computes in full) enters with its gradient scaled by
  1/world_size, so after averaging both equal the single-process gradients. Backpropagate it.

Logits are cosine similarities divided by tau (embeddings arrive L2-normalised). False in-batch
negatives are masked by int64 content ids: a column whose candidate id equals the row's positive id
(or, on the positive block, whose query id equals the row's query id) is removed from the softmax,
except the row's own label column.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

NEG_INF = float("-inf")


@dataclass
class LossOutput:
    """Result of a loss call; see the module docstring for `loss` vs `backward_loss`."""

    loss: Tensor
    backward_loss: Tensor
    accuracy: Tensor
    rows: int
    metrics: dict[str, Tensor] = field(default_factory=dict)  # diagnostics, detached (e.g. entropies)

    def detached(self) -> LossOutput:
        return LossOutput(
            self.loss.detach(), self.backward_loss.detach(), self.accuracy.detach(), self.rows, self.metrics
        )


def stable_id(text: str) -> int:
    """A process-independent signed int64 id for a string (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def dist_world() -> tuple[int, int]:
    """(world_size, rank), (1, 0) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather along dim 0 (shards may differ in length); the local shard keeps its gradients."""
    world, rank = dist_world()
    if world == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    lengths = [int(s.item()) for s in sizes]
    longest = max(lengths)
    padded = x.detach()
    if x.shape[0] < longest:
        pad = torch.zeros((longest - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded = torch.cat([padded, pad])
    buffers = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(buffers, padded.contiguous())
    parts = [b[:length] for b, length in zip(buffers, lengths, strict=True)]
    parts[rank] = x
    return torch.cat(parts)


def scale_grad(x: Tensor, scale: float) -> Tensor:
    """Same value as `x`, gradient multiplied by `scale`."""
    if scale == 1.0 or not x.requires_grad:
        return x
    return x.detach() + scale * (x - x.detach())


def _as_tau(tau: Tensor | float, like: Tensor) -> Tensor:
    if isinstance(tau, Tensor):
        return tau.to(device=like.device, dtype=like.dtype)
    return torch.tensor(float(tau), device=like.device, dtype=like.dtype)


def false_negative_mask(pos_ids: Tensor, cand_ids: Tensor, query_ids: Tensor | None = None) -> Tensor:
    """Bool [N, C] mask of columns that must not act as negatives for each row.

    `cand_ids[:N]` are the rows' own positives (column i is row i's label and never masked).
    Column j is masked when its candidate equals row i's positive, or (positive block only) when
    query j is the same query as row i, i.e. its positive is also a positive of row i.
    """
    n = pos_ids.shape[0]
    mask = cand_ids[None, :] == pos_ids[:, None]
    if query_ids is not None:
        mask[:, :n] |= query_ids[None, :] == query_ids[:, None]
    mask[torch.arange(n, device=mask.device), torch.arange(n, device=mask.device)] = False
    return mask


def info_nce(
    q: Tensor,
    p: Tensor,
    negatives: Tensor | None = None,
    tau: Tensor | float = 0.05,
    *,
    pos_ids: Tensor | None = None,
    neg_ids: Tensor | None = None,
    query_ids: Tensor | None = None,
    symmetric: bool = False,
    gather: bool = True,
) -> LossOutput:
    """InfoNCE over all workers' queries x (all positives + all hard negatives).

    q, p: [B, D] local queries and their positives; negatives: [B*K, D] local hard negatives (or
    None). Labels are the global diagonal (row i's positive is column i). `symmetric` adds the
    candidate->query direction over the positive block (stage 2) and averages the two.
    """
    world = dist_world()[0] if gather else 1
    gat = gather_with_grad if world > 1 else (lambda t: t)
    tau_t = scale_grad(_as_tau(tau, q), 1.0 / world)
    big_q, big_p = gat(q), gat(p)
    cands = big_p if negatives is None else torch.cat([big_p, gat(negatives)])
    n = big_q.shape[0]
    labels = torch.arange(n, device=q.device)
    logits = big_q @ cands.T / tau_t
    mask = None
    if pos_ids is not None:
        if negatives is not None and neg_ids is None:
            raise ValueError("neg_ids are required to mask false negatives when negatives are given")
        all_pos = gat(pos_ids)
        all_cand = all_pos if negatives is None else torch.cat([all_pos, gat(neg_ids)])
        mask = false_negative_mask(all_pos, all_cand, gat(query_ids) if query_ids is not None else None)
        logits = logits.masked_fill(mask, NEG_INF)
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        logits_cq = big_p @ big_q.T / tau_t
        if mask is not None:
            logits_cq = logits_cq.masked_fill(mask[:, :n].T, NEG_INF)
        loss = (loss + F.cross_entropy(logits_cq, labels)) / 2
    with torch.no_grad():
        acc = (logits.argmax(dim=1) == labels).float().mean()
    return LossOutput(loss=loss, backward_loss=loss * world, accuracy=acc, rows=n)


def kl_distill(
    q: Tensor,
    cands: Tensor,
    teacher_scores: Tensor,
    tau: Tensor | float = 0.05,
    mask: Tensor | None = None,
) -> LossOutput:
    """KL(softmax(teacher / (2 tau)) || softmax(student_cos / tau)), mean over queries.

    The U-MARVEL paper's distillation loss (docs/RECIPE.md section 3): the teacher score is
    cos + w * P(Yes) of the stage-4 retriever and the re-ranker, at temperature 2 tau; the student
    is the embedder's cos at its own tau.
    q: [B, D]; cands: [B*M, D] (or [B, M, D]) each query's own candidate list; teacher_scores: [B, M];
    mask: optional bool [B, M], True for real candidates (lists shorter than M are padded). No
    in-batch negatives. tau is detached on the teacher side so the target is not learned. Each rank
    returns its local mean; equal per-rank batches make DeepSpeed's gradient average the global mean.
    `metrics` carries the mean entropies (nats) of the teacher's and the student's distributions:
    a teacher much flatter than the student pulls the student's ranking flat.
    """
    b, m = teacher_scores.shape
    cands = cands.reshape(b, m, -1)
    tau_t = _as_tau(tau, q)
    student = torch.einsum("bd,bmd->bm", q, cands) / tau_t
    teacher = teacher_scores.to(student.dtype) / (2 * tau_t.detach())
    if mask is not None:
        student = student.masked_fill(~mask, NEG_INF)
        teacher = teacher.masked_fill(~mask, NEG_INF)
    log_s = F.log_softmax(student, dim=1)
    log_t = F.log_softmax(teacher, dim=1)
    terms = log_t.exp() * (log_t - log_s)
    if mask is not None:
        terms = terms.masked_fill(~mask, 0.0)
    loss = terms.sum(dim=1).mean()
    with torch.no_grad():
        acc = (student.argmax(dim=1) == teacher.argmax(dim=1)).float().mean()
        metrics = {"teacher_entropy": _entropy(log_t), "student_entropy": _entropy(log_s)}
    return LossOutput(loss=loss, backward_loss=loss, accuracy=acc, rows=b, metrics=metrics)


def _entropy(log_p: Tensor) -> Tensor:
    """Mean over rows of -sum p log p (nats); masked entries (log p = -inf) contribute 0."""
    p = log_p.exp()
    return -(p * log_p.masked_fill(p == 0, 0.0)).sum(dim=1).mean()


class _RngState:
    """CPU (+ CUDA) RNG state, so a re-run forward draws the same dropout masks as the cached one."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


Encode = Callable[[Any], tuple[Tensor, Tensor | None]]


def cached_backward(
    encode: Encode,
    chunks: dict[str, Sequence[Any]],
    loss_fn: Callable[[dict[str, Tensor], Tensor | None], LossOutput],
    backward: Callable[[Tensor], None],
) -> LossOutput:
    """GradCache: the contrastive loss of a large batch with the memory of one micro-batch.

    `chunks` maps a role ("query", "positive", "negatives", ...) to a list of micro-batches; all lists
    have the same length K and chunk k of every role belongs to the same queries. `encode(batch)`
    returns (embeddings, tau) where tau is the model's temperature tensor or None.

    1. Encode every micro-batch without autograd (remembering the RNG state of each call).
    2. Run `loss_fn(full_embeddings, tau)` on the concatenated embeddings (it gathers across workers)
       and take d backward_loss / d embeddings (and d/d tau).
    3. For each k, re-encode chunk k with autograd under the same RNG state and call
       `backward(sum(emb * cached_grad) + tau * dL/dtau / K)` — K backward calls.

    Every backward carries its 1/K share of the temperature's gradient (rather than all of it on
    the last chunk) so each backward reaches every trainable parameter: DeepSpeed ZeRO-3 starts a
    step's gradient by copying on the first micro-step and adds on later ones, per micro-step and
    not per parameter, so a parameter first reached in micro-step 2 would add onto the previous
    step's gradient (measured: tau drifted from the ZeRO-0 run from the second step on).

    The parameter gradients equal those of one backward through the full batch, so the number of
    in-batch negatives is workers x per-worker batch, whatever micro-batch fits in memory.
    """
    roles = list(chunks)
    k_chunks = {len(chunks[r]) for r in roles}
    if len(k_chunks) != 1:
        raise ValueError(
            f"every role needs the same number of chunks, got { {r: len(chunks[r]) for r in roles} }"
        )
    (k_total,) = k_chunks
    states: dict[tuple[str, int], _RngState] = {}
    parts: dict[str, list[Tensor]] = {r: [] for r in roles}
    tau_value: Tensor | None = None
    with torch.no_grad():
        for k in range(k_total):
            for r in roles:
                states[r, k] = _RngState()
                emb, tau = encode(chunks[r][k])
                parts[r].append(emb.detach())
                if tau is not None:
                    tau_value = tau.detach()
    full = {r: torch.cat(parts[r]).requires_grad_(True) for r in roles}
    tau_leaf = tau_value.clone().requires_grad_(True) if tau_value is not None else None
    with torch.enable_grad():
        out = loss_fn(full, tau_leaf)
        leaves = [full[r] for r in roles] + ([tau_leaf] if tau_leaf is not None else [])
        grads = torch.autograd.grad(out.backward_loss, leaves, allow_unused=True)
    emb_grads = {r: grads[i] for i, r in enumerate(roles)}
    tau_grad = grads[-1] if tau_leaf is not None else None
    offsets = {r: 0 for r in roles}
    rng_after = _RngState()
    for k in range(k_total):
        surrogate: Tensor | None = None
        tau_live: Tensor | None = None
        for r in roles:
            states[r, k].restore()
            emb, tau = encode(chunks[r][k])
            g = emb_grads[r]
            start = offsets[r]
            offsets[r] = start + emb.shape[0]
            if g is not None:
                term = (emb * g[start : offsets[r]].to(emb.dtype)).sum()
                surrogate = term if surrogate is None else surrogate + term
            if tau is not None:
                tau_live = tau
        if tau_grad is not None and tau_live is not None and tau_live.requires_grad:
            term = (tau_live * (tau_grad / k_total)).sum()
            surrogate = term if surrogate is None else surrogate + term
        if surrogate is not None:
            backward(surrogate)
    rng_after.restore()
    return out.detached()


def split_chunks(n: int, micro: int) -> list[slice]:
    """Row slices of at most `micro` rows covering range(n)."""
    micro = max(1, micro)
    return [slice(i, min(i + micro, n)) for i in range(0, n, micro)]
