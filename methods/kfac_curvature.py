"""Loss-curvature editing with K-FAC (Merullo, Vatsavaya, Bushnaq & Lewis 2025, arXiv 2510.24256).

For every MLP projection W [d_out, d_in] (up/gate or a fused gate_up, and down) the Fisher block is
approximated by K-FAC, F_W ≈ G ⊗ A with A = E[a aᵀ] over the layer's inputs and G = E[g gᵀ] over the
gradients of the next-token loss with respect to its outputs, on *general* text (the retain set; no forget
set is needed). With A = U_A diag(μ) U_Aᵀ and G = U_G diag(λ) U_Gᵀ, the component u_i v_jᵀ of W has
curvature λ_i μ_j. The edit keeps the highest-curvature components until a fraction ρ of the total mass
(Σλ)(Σμ) is reached and drops the rest: W' = U_G [(U_Gᵀ W U_A) ⊙ M] U_Aᵀ. ``budget = 1 − ρ``.

Differences from the reference code (goodfire-ai/memorization_kfac):
- the selection is vectorised: a bisection on the curvature threshold τ with mass(τ) = Σ_i λ_i Σ_{μ_j ≥ τ/λ_i} μ_j
  evaluated by ``searchsorted`` on sorted μ (O(d_out log d_in) per step) instead of a Python heap over
  d_out·d_in pairs; all pairs tied at the threshold are kept (the heap's order among ties is arbitrary);
- factors are collected with gold labels (empirical Fisher, the collector's default) unless
  ``sample_labels``; pad positions are excluded; factors are cached on disk under
  ``$MEMEVAL_CACHE/kfac/<model fingerprint>-<config hash>/`` together with their eigendecompositions;
- without a retain set (DEL's set granularity) the general text is sampled from the model itself.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from memeval import hookimpl
from memeval.api import Editor, SequenceSet
from memeval.errors import UsageError
from memeval.models import NeuronModel, set_weight_out_in, weight_out_in
from memeval_methods._editing import general_text, mlp_matrices, set_digest


def cache_dir() -> Path:
    return Path(os.environ.get("MEMEVAL_CACHE") or "~/.cache/memeval").expanduser() / "kfac"


# ---------------------------------------------------------------------------------------------
# Factor collection


def collect_factors(model: NeuronModel, text: SequenceSet, layers: list[int], projections: list[str],
                    batch_size: int = 8, sample_labels: bool = False, seed: int = 0
                    ) -> dict[str, dict[str, torch.Tensor]]:
    """K-FAC factors ``{"<layer>.<proj>": {"A": [d_in, d_in], "G": [d_out, d_out], "tokens": n}}`` (float32,
    on the model's device), each an average over the scored token positions of ``text``.

    No parameter of ``model`` is changed: gradients flow from input embeddings that require grad.
    """
    targets = factor_targets(model, layers, projections)
    dev = model.device
    A = {k: torch.zeros(_dims(m)[1], _dims(m)[1], device=dev) for k, m in targets.items()}
    G = {k: torch.zeros(_dims(m)[0], _dims(m)[0], device=dev) for k, m in targets.items()}
    count = 0
    state: dict[str, torch.Tensor] = {}
    handles = []
    gen = torch.Generator(device=dev).manual_seed(seed)

    def fwd_hook(key):
        def hook(module, args, output):
            a = args[0]
            sel = state["sel"]
            a = a.detach().reshape(*state["bt"], a.shape[-1])[sel].float()
            A[key].addmm_(a.T, a)
            if output.requires_grad:
                def grad_hook(g):
                    g = g.reshape(*state["bt"], g.shape[-1])[sel].float()
                    G[key].addmm_(g.T, g)
                output.register_hook(grad_hook)
        return hook

    for key, m in targets.items():
        handles.append(m.register_forward_hook(fwd_hook(key)))
    embed = model.hf.get_input_embeddings()
    try:
        for batch in text.batches(batch_size, dev):
            # a position contributes when it predicts a scored token (last position of each row dropped)
            sel = torch.zeros_like(batch.loss_mask)
            sel[:, :-1] = batch.loss_mask[:, 1:]
            state["sel"], state["bt"] = sel, tuple(batch.input_ids.shape)
            emb = embed(batch.input_ids).detach().requires_grad_(True)
            logits = model.hf(inputs_embeds=emb, attention_mask=batch.attention_mask, use_cache=False).logits
            logits = logits[:, :-1][sel[:, :-1]].float()
            if sample_labels:
                labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=gen).squeeze(-1)
            else:
                labels = batch.input_ids[:, 1:][sel[:, :-1]]
            # sum over tokens: each token's gradient is its own (the per-token Fisher), not scaled by 1/N
            loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
            torch.autograd.grad(loss, emb)
            count += int(sel.sum())
    finally:
        for h in handles:
            h.remove()
    return {k: {"A": A[k] / count, "G": G[k] / count, "tokens": count} for k in targets}


def factor_targets(model: NeuronModel, layers: list[int], projections: list[str]) -> dict[str, torch.nn.Module]:
    """``{"<layer>.<proj>": module}`` of the named projections (``all``: every one of :func:`mlp_matrices`)."""
    targets = {}
    for l in layers:
        mats = mlp_matrices(model, l)
        for p in projections:
            if p == "all":
                targets.update({f"{l}.{n}": m for n, m in mats.items()})
            elif p in mats:
                targets[f"{l}.{p}"] = mats[p]
            else:
                raise UsageError(f"kfac_curvature: layer {l} has no MLP matrix '{p}' (it has {', '.join(mats)})")
    return targets


def _dims(module) -> tuple[int, int]:
    w = weight_out_in(module)
    return int(w.shape[0]), int(w.shape[1])


def eigh_desc(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending, clipped at 0) and eigenvectors (columns) of a symmetric PSD matrix."""
    dtype = torch.float64 if mat.shape[0] <= 4096 else torch.float32
    vals, vecs = torch.linalg.eigh(mat.to(dtype))
    vals, vecs = vals.flip(0).clamp(min=0), vecs.flip(1)
    return vals, vecs


# ---------------------------------------------------------------------------------------------
# Selection and edit


def curvature_threshold(lam: torch.Tensor, mu: torch.Tensor, rho: float, iters: int = 100) -> float:
    """The largest τ such that the pairs with λ_i μ_j ≥ τ hold at least ``rho`` of Σλ·Σμ.

    Vectorised bisection on τ (log scale); mass(τ) = Σ_i λ_i · (sum of μ_j ≥ τ/λ_i) via searchsorted on the
    ascending μ and its suffix sums. Returns 0.0 when everything must be kept.
    """
    lam = lam.double().clamp(min=0)
    mu_sorted, _ = mu.double().clamp(min=0).sort()
    suffix = torch.cat([mu_sorted.flip(0).cumsum(0).flip(0), mu_sorted.new_zeros(1)])  # suffix[k] = Σ_{j≥k}
    total = float(lam.sum() * mu_sorted.sum())
    if total <= 0 or rho >= 1:
        return 0.0
    target = rho * total

    def mass(tau: float) -> float:
        pos = lam > 0
        idx = torch.searchsorted(mu_sorted, tau / lam[pos], right=False)  # first μ ≥ τ/λ
        return float((lam[pos] * suffix[idx]).sum())

    hi = float(lam.max() * mu_sorted[-1])  # mass(hi) > 0 (the top pair)
    lo = hi
    while mass(lo) < target and lo > 1e-300:
        lo /= 16
    if mass(lo) < target:
        return 0.0
    if lo == hi:
        return hi
    # invariant: mass(lo) ≥ target > mass(hi')  (hi' slightly above hi, for which mass = 0)
    hi = hi * (1 + 1e-12)
    for _ in range(iters):
        mid = (lo * hi) ** 0.5 if lo > 0 else hi / 2
        if mass(mid) >= target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return lo


def keep_mask(lam: torch.Tensor, mu: torch.Tensor, rho: float) -> torch.Tensor:
    """Boolean ``[len λ, len μ]``: the highest-curvature pairs holding ≥ ``rho`` of the mass."""
    tau = curvature_threshold(lam, mu, rho)
    return torch.outer(lam.double(), mu.double()) >= tau


def kfac_edit_weight(weight: torch.Tensor, eig_g: tuple[torch.Tensor, torch.Tensor],
                     eig_a: tuple[torch.Tensor, torch.Tensor], rho: float) -> tuple[torch.Tensor, float]:
    """W' = U_G [(U_Gᵀ W U_A) ⊙ M] U_Aᵀ for ``weight`` [d_out, d_in]; also the fraction of pairs kept."""
    (lam, ug), (mu, ua) = eig_g, eig_a
    mask = keep_mask(lam, mu, rho)
    dtype = ug.dtype
    coef = ug.T @ weight.to(dtype) @ ua
    new = ug @ (coef * mask) @ ua.T
    return new.to(weight.dtype), float(mask.float().mean())


# ---------------------------------------------------------------------------------------------
# The editor


class KFACCurvature(Editor):
    name = "kfac_curvature"
    summary = "Drop the low-curvature K-FAC eigencomponents of every MLP matrix (no forget set needed)"
    paper = "Merullo, Vatsavaya, Bushnaq & Lewis 2025, arXiv 2510.24256"

    @dataclass
    class Config(Editor.Config):
        layers: list[int] | None = None  # None: every layer
        projections: list[str] | None = None  # None: every MLP matrix (gate/up or gate_up, down); or e.g. [up, gate]
        max_sequences: int = 256  # general-text sequences used for the factors
        sample_labels: bool = False  # true: labels sampled from the model (true Fisher)
        batch_size: int = 8
        sampled_sequences: int = 64  # without a retain set: sequences sampled from the model
        sampled_length: int = 64

    def __init__(self, config=None) -> None:
        super().__init__(config)
        self._memo: dict[str, dict] = {}

    def _layers(self, model: NeuronModel) -> list[int]:
        return [l % model.num_layers for l in self.config.layers] if self.config.layers else list(range(model.num_layers))

    def factors(self, model: NeuronModel, retain: SequenceSet | None) -> dict[str, dict]:
        """Factors and their eigendecompositions, from memory, the disk cache, or collected now."""
        cfg = self.config
        layers, projections = self._layers(model), cfg.projections or ["all"]
        text = general_text(model, retain, cfg.sampled_sequences, cfg.sampled_length, cfg.seed)
        text = SequenceSet(text.sequences[: cfg.max_sequences], text.pad_id)
        blob = json.dumps({"config": asdict(cfg), "text": set_digest(text), "v": 1}, sort_keys=True, default=str)
        key = f"{model.fingerprint()}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
        if key in self._memo:
            return self._memo[key]
        path = cache_dir() / key / "factors.pt"
        eig = None
        if path.exists():
            try:
                eig = torch.load(path, map_location=model.device)
            except Exception:  # a corrupt cache entry is rebuilt
                eig = None
        # an entry lacking a matrix (written before fused gate/up projections were found) is rebuilt too
        if eig is not None and set(factor_targets(model, layers, projections)) - set(eig):
            eig = None
        if eig is None:
            fac = collect_factors(model, text, layers, projections, cfg.batch_size, cfg.sample_labels, cfg.seed)
            eig = {}
            for k, f in fac.items():
                eig[k] = {"G": eigh_desc(f["G"]), "A": eigh_desc(f["A"]), "tokens": f["tokens"]}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            torch.save({k: {"G": tuple(t.cpu() for t in v["G"]), "A": tuple(t.cpu() for t in v["A"]),
                            "tokens": v["tokens"]} for k, v in eig.items()}, tmp)
            os.replace(tmp, path)
        self._memo = {key: eig}
        return eig

    def edit(self, model: NeuronModel, forget: SequenceSet | None, retain: SequenceSet | None,
             budget: float) -> NeuronModel:
        rho = 1.0 - float(budget)
        eig = self.factors(model, retain)
        edited = model.clone()
        if budget <= 0:
            return edited
        for l in self._layers(model):
            mats = mlp_matrices(edited, l)
            for name, module in mats.items():
                key = f"{l}.{name}"
                if key not in eig:
                    continue
                e = eig[key]
                dev = module.weight.device
                new, _ = kfac_edit_weight(weight_out_in(module).detach(), tuple(t.to(dev) for t in e["G"]),
                                          tuple(t.to(dev) for t in e["A"]), rho)
                set_weight_out_in(module, new)
        return edited


@hookimpl
def memeval_methods():
    return [KFACCurvature]
