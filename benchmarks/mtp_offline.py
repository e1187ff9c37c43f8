"""How many verify steps MTP drafts (argmax) and SAM + MTP need on fixed rollout texts, against
SAM alone: the replay of `benchmarks/sam_offline.py` with the MTP module's drafts beside SAM's.

    python benchmarks/mtp_offline.py --train TEXTS --texts TEXTS [--epochs 4] [--ks 3,6]
        [--min-match 2] [--sam-thresholds 2,4,6] [--module DIR] [--json OUT]

Texts are `sam_offline.py --generate` files (SmolLM2-135M-Instruct's own samples on
`arithmetic_set`, T = 1, top-p 0.7). First the MTP module is warmed up as the `mtp_warmup`
stage does (self-distillation: it learns to predict the policy's own next tokens from the
trunk's states, depths 1..3 teacher-forced, `MTPModule.forward_train`), on --train's texts,
here with a head over the tokens those texts use (what `mtp_vocab` drafts from) so that it
trains on 2 CPU cores in minutes. --module DIR loads a module (mtp.safetensors) instead, or
saves the trained one there if it has none.

Then, on --texts (held out), every depth's argmax draft at every position comes from one
teacher-forced pass (`forward_train`: depth d at row j predicts token j + d from the tokens
before it, which is what the drafter drafts there as long as its earlier drafts were
accepted). Argmax drafts are deterministic, so the replay couples exactly with the texts:
a draft is accepted iff it is the text's next token (`sam_offline.py`'s argument), and the
verify steps counted are those the engine's speculative decoding of these texts takes.

Drafters replayed: sam (the latest occurrence, `sam_match: latest`), mtp (argmax,
`mtp_draft: argmax`), sam+mtp at SAM thresholds (SAM's draft where its match is at least that
long, else MTP's: `sam_min_match` of a sam+mtp run), `oracle` (whichever of the two passes
more: what verifying both chains in one step gives) and `chains4` (the best of four chains:
SAM's latest and first occurrences, MTP's argmax chain, and the chain that starts from MTP's
depth-1 runner-up).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sam_offline import Matcher, passed  # noqa: E402
from sam_offline import replay as replay_texts  # noqa: E402


def _texts(path: str) -> list[tuple[list[int], list[int]]]:
    with open(path) as f:
        data = json.load(f)
    n = data["n"]
    return [(data["prompts"][i // n], c) for i, c in enumerate(data["completions"]) if len(c) > 1]


@torch.no_grad()
def trunk_states(model, texts) -> list[torch.Tensor]:
    """Per text: [len(completion), H] float32, row j the trunk's state that predicts token j."""
    out = []
    for prompt, comp in texts:
        ids = torch.tensor([prompt + comp])
        h = model(ids)[0]  # final-norm states, [T, H]
        out.append(h[len(prompt) - 1 : len(prompt) - 1 + len(comp)].float())
    return out


def train(model, mtp, texts, states, ids, epochs: int, depth: int = 3, lr: float = 1e-3) -> None:
    head = model.lm_head.weight.detach()[ids].float()  # [N, H]
    where = torch.full((model.args.vocab_size,), -1, dtype=torch.long)
    where[ids] = torch.arange(len(ids))
    opt = torch.optim.AdamW(mtp.parameters(), lr=lr, weight_decay=0.0)
    order = np.random.default_rng(0).permutation(len(texts))
    for epoch in range(epochs):
        t0, total, hits, count = time.perf_counter(), 0.0, 0, 0
        for i in order:
            prompt, comp = texts[i]
            tok = torch.tensor([comp])
            start = torch.tensor([len(prompt) - 1])
            outs = mtp.forward_train(model, states[i][None], tok, start, depth)
            loss = torch.zeros(())
            for d, g in enumerate(outs, 1):
                if d >= len(comp):
                    break
                target = where[tok[0, d:]]
                logits = g[0, : len(comp) - d] @ head.T
                loss = loss + F.cross_entropy(logits, target, reduction="sum")
                if d == 1:
                    hits += int((logits.argmax(-1) == target).sum())
                    count += len(target)
            opt.zero_grad()
            (loss / len(comp)).backward()
            torch.nn.utils.clip_grad_norm_(mtp.parameters(), 1.0)
            opt.step()
            total += float(loss.detach())
        print(
            f"epoch {epoch + 1}: loss/token {total / sum(len(c) for _, c in texts):.3f}, "
            f"depth-1 top-1 {hits / max(count, 1):.3f}, {time.perf_counter() - t0:.0f} s",
            flush=True,
        )


@torch.no_grad()
def draft_table(model, mtp, texts, states, ids, kmax: int) -> list[np.ndarray]:
    """Per text: [len, kmax + 1], entry (j, d - 1) the depth-d argmax draft at row j (over
    ids), and last the depth-1 draft's runner-up (a second chain's first token)."""
    head = model.lm_head.weight.detach()[ids].float()
    tabs = []
    for (prompt, comp), h in zip(texts, states, strict=True):
        outs = mtp.forward_train(
            model, h[None], torch.tensor([comp]), torch.tensor([len(prompt) - 1]), kmax
        )
        cols = [ids[(g[0] @ head.T).argmax(-1)].numpy() for g in outs]
        second = ids[(outs[0][0] @ head.T).topk(2, dim=-1).indices[:, 1]].numpy()
        tabs.append(np.stack([*cols, second], axis=1))
    return tabs


CHAINS4 = ["sam", "first", "mtp", "runner"]


def replay(texts, tabs, k: int, drafter: str, min_match: int) -> dict:
    """Verify steps per sequence with `drafter`'s drafts (`sam_offline.replay`)."""
    by_sam = 0

    def draft(b: int, m: Matcher, room: int, at: int) -> np.ndarray:
        nonlocal by_sam
        comp = texts[b][1]
        sam = m.draft(room, min_match, "latest") if drafter != "mtp" else m.h[:0]
        row = tabs[b][at - 1]
        mtp = row[:room]
        if drafter == "oracle":
            d = sam if passed(sam, comp, at) >= passed(mtp, comp, at) else mtp
        elif drafter == "chains4" or drafter.startswith("chains:"):
            # The best of several chains verified in one step: SAM's latest (sam), first
            # (first) and second-latest (second) occurrences, MTP's chain (mtp) and the chain
            # from its depth-1 runner-up (runner; deeper depths teacher-forced: valid while it
            # passes). chains4 = chains:sam,first,mtp,runner.
            names = CHAINS4 if drafter == "chains4" else drafter[len("chains:") :].split(",")
            chains = []
            for name in names:
                if name == "sam":
                    chains.append(sam)
                elif name in ("first", "second"):
                    chains.append(m.draft(room, min_match, name))
                elif name == "mtp":
                    chains.append(mtp)
                elif name == "runner":
                    chains.append(np.concatenate([row[-1:], row[1:room]]))
                else:
                    raise ValueError(f"unknown chain {name!r} in {drafter!r}")
            d = max(chains, key=lambda c: passed(c, comp, at))
        elif drafter == "sam" or (drafter == "sam+mtp" and len(sam)):
            d = sam
        else:
            d = mtp
        by_sam += drafter != "mtp" and d is sam and len(sam) > 0
        return d

    counts = replay_texts(texts, k, draft)
    del counts["batch_steps"]  # no tail setting: every sequence runs as it would alone
    return {
        "drafter": drafter,
        "k": k,
        "sam_min_match": min_match if drafter != "mtp" else None,
        **counts,
        "sam_share": by_sam / max(counts["steps_total"], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--train", required=True, help="texts to warm the module up on")
    ap.add_argument("--texts", required=True, help="held-out texts to replay")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--ks", default="3,6")
    ap.add_argument("--min-match", type=int, default=2, help="sam's threshold")
    ap.add_argument("--sam-thresholds", default="2,4,6", help="sam+mtp's SAM thresholds")
    ap.add_argument("--module", default=None, help="a directory: load mtp.safetensors, or save")
    ap.add_argument(
        "--chains", default="", help="more chain sets, ';'-separated: chains:sam,first,mtp"
    )
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from rlkit.models.loading import load_model, resolve_model_dir
    from rlkit.models.mtp import MTP_FILE, init_mtp, load_mtp, save_mtp

    model_dir = resolve_model_dir("smollm2-135m-instruct")
    model, _ = load_model(model_dir, dtype=torch.float32)
    model.eval()
    train_texts, texts = _texts(a.train), _texts(a.texts)
    seen = sorted({t for p, c in train_texts for t in p + c})
    ids = torch.tensor(seen)
    t0 = time.perf_counter()
    held = trunk_states(model, texts)
    print(f"{len(texts)} held-out texts, trunk states in {time.perf_counter() - t0:.0f} s")
    mtp = None
    if a.module and os.path.isfile(os.path.join(a.module, MTP_FILE)):
        mtp = load_mtp(a.module, model.args)
    if mtp is None:
        mtp = init_mtp(model.args, seed=0)
        states = trunk_states(model, train_texts)
        print(f"{len(train_texts)} train texts, {len(ids)} distinct tokens", flush=True)
        train(model, mtp, train_texts, states, ids, a.epochs)
        if a.module:
            os.makedirs(a.module, exist_ok=True)
            save_mtp(mtp, a.module)
    mtp.eval()
    ks = [int(k) for k in a.ks.split(",")]
    tabs = draft_table(model, mtp, texts, held, ids, max(ks))
    rows = []
    for k in ks:
        runs = [("sam", a.min_match), ("mtp", 0)]
        runs += [("sam+mtp", int(t)) for t in a.sam_thresholds.split(",")]
        runs += [("oracle", a.min_match), ("chains4", a.min_match)]
        runs += [(c, a.min_match) for c in a.chains.split(";") if c]
        for drafter, mm in runs:
            r = replay(texts, tabs, k, drafter, mm)
            rows.append(r)
            print(json.dumps(r), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"train": a.train, "texts": a.texts, "records": rows}, f, indent=1)


if __name__ == "__main__":
    main()
