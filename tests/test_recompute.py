"""The contract's numbers against an independent recomputation from the contract files alone:
the tokens, the lens folder (loaded by tuned-lens itself) and the prepared model (loaded by
transformers itself). None of lensspace's own code runs on this side.

``recompute`` is also used by ``validation/recompute.py`` on a finished default run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from tuned_lens.model_surgery import get_final_norm
from tuned_lens.nn import TunedLens

STORAGE = {"float16": torch.float16, "float32": torch.float32}


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> np.ndarray:
    lp = torch.log_softmax(p_logits.double(), -1)
    lq = torch.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1).numpy()


@torch.no_grad()
def recompute(
    run_dir: Path, model_dir: Path, storage: str, batch: int = 4
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Lens KL per layer (tuned, logit) and the seed-layout H0 cells (basis unembed, zero
    ablation before the final norm, k = d/2), from ``run_dir``'s tokens and lens folder.

    Residuals are rounded to the cache's storage type, as the workflow's cache stores them.
    """
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lens = TunedLens.from_model_and_pretrained(model, str(run_dir / "lens")).float().eval()
    ids = load_file(run_dir / "data" / "tokens.safetensors")["eval"].long()
    n_layers = len(lens)
    w_u = lens.unembed.unembedding.weight.detach().double().numpy()
    d = w_u.shape[1]
    vt = np.linalg.svd(w_u, full_matrices=False)[2]
    out_q = torch.from_numpy(vt[: d // 2].T.copy()).float()
    int_q = torch.from_numpy(vt[d - d // 2 :].T.copy()).float()
    captured = {}
    # the model's own final norm (tuned-lens's Unembed holds a copy): its input is the last residual
    hook = get_final_norm(model).register_forward_pre_hook(
        lambda _m, args: captured.__setitem__("last", args[0])
    )
    kl = {
        (layer, name): []
        for layer in range(n_layers)
        for name in ("tuned", "logit", "output", "internal")
    }
    try:
        for start in range(0, len(ids), batch):
            hidden = model(ids[start : start + batch], output_hidden_states=True).hidden_states
            rounded = [h.to(STORAGE[storage]).float()[:, 1:] for h in hidden[:n_layers]]
            last = captured["last"].to(STORAGE[storage]).float()[:, 1:]
            final = lens.unembed(last)
            for layer, h in enumerate(rounded):
                z = lens.transform_hidden(h, layer)
                clean = lens.unembed(z)
                kl[(layer, "tuned")].append(_kl(final, clean))
                kl[(layer, "logit")].append(_kl(final, lens.unembed(h)))
                for name, q in (("output", out_q), ("internal", int_q)):
                    kl[(layer, name)].append(_kl(clean, lens.unembed(z - (z @ q) @ q.T)))
    finally:
        hook.remove()
    means = {key: float(np.concatenate(parts).mean()) for key, parts in kl.items()}
    lens_kl = pd.DataFrame(
        [
            {"layer": layer, "lens": name, "kl": means[(layer, name)]}
            for layer in range(n_layers)
            for name in ("tuned", "logit")
        ]
    )
    h0 = pd.DataFrame(
        [
            {"layer": layer, "subspace": name, "k": d // 2, "kl": means[(layer, name)]}
            for layer in range(n_layers)
            for name in ("output", "internal")
        ]
    )
    return lens_kl, h0


def compare_with_contract(run_dir: Path, lens_kl: pd.DataFrame, h0: pd.DataFrame) -> pd.DataFrame:
    """Each recomputed number beside the contract's, with the relative difference."""
    ours = pd.read_csv(run_dir / "lens_eval.tsv", sep="\t")
    a = lens_kl.merge(
        ours[["layer", "lens", "kl"]], on=["layer", "lens"], suffixes=("_recomputed", "_contract")
    )
    a["what"] = "lens " + a["lens"]
    ablation = pd.read_csv(run_dir / "h0" / "ablation.tsv", sep="\t")
    seed = ablation[
        (ablation["basis"] == "unembed")
        & (ablation["mode"] == "zero")
        & (ablation["site"] == "pre_norm")
    ]
    b = h0.merge(
        seed[["layer", "subspace", "k", "kl"]],
        on=["layer", "subspace", "k"],
        suffixes=("_recomputed", "_contract"),
    )
    b["what"] = "H0 " + b["subspace"]
    both = pd.concat([a, b], ignore_index=True)[["what", "layer", "kl_recomputed", "kl_contract"]]
    both["rel_diff"] = (both["kl_contract"] - both["kl_recomputed"]).abs() / both[
        "kl_recomputed"
    ].abs()
    return both


@pytest.mark.workflow
@pytest.mark.parametrize("run", ["tiny-llama", "tiny-gpt2"])
def test_contract_numbers_match_an_independent_recomputation(tiny_run, run):
    workdir, config = tiny_run
    run_dir = workdir / "results" / run
    model_dir = workdir / "resources" / "models" / config["runs"][run]["model"]
    lens_kl, h0 = recompute(run_dir, model_dir, config["cache"]["storage"])
    both = compare_with_contract(run_dir, lens_kl, h0)
    n_layers = config["models"][config["runs"][run]["model"]]["n_layers"]
    assert len(both) == 4 * n_layers  # tuned, logit, output, internal at every layer
    assert both["rel_diff"].max() < 1e-4, both.sort_values("rel_diff").tail(5).to_string()
